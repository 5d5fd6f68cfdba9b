"""FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization"):
v_t = v_{t-1} - (1 - beta2) d_t^2 sign(v_{t-1} - d_t^2).

The rest of the step is shared with FedAdagrad and FedAdam (fedopt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .fedopt import FedOpt, FedOptConfig
from .registry import register


@dataclass(frozen=True)
class FedYogiConfig(FedOptConfig):
    name: ClassVar[str] = "fedyogi"


class FedYogi(FedOpt):
    def second_moment(self, v, d, out):
        square = d.square()
        torch.addcmul(v, square, torch.sub(v, square).sign_(), value=-(1 - self.config.beta2), out=out)


register(FedYogiConfig, FedYogi)
