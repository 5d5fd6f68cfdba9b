"""FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"): v_t = beta2 v_{t-1} + (1 - beta2) d_t^2.

The rest of the step is shared with FedAdagrad and FedYogi (fedopt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .fedopt import FedOpt, FedOptConfig
from .registry import register


@dataclass(frozen=True)
class FedAdamConfig(FedOptConfig):
    name: ClassVar[str] = "fedadam"


class FedAdam(FedOpt):
    def second_moment(self, v, d, out):
        torch.mul(v, self.config.beta2, out=out).addcmul_(d, d, value=1 - self.config.beta2)


register(FedAdamConfig, FedAdam)
