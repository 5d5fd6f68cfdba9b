"""FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization"): v_t = v_{t-1} + d_t^2.

The rest of the step is shared with FedYogi and FedAdam (fedopt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .fedopt import FedOpt, FedOptConfig
from .registry import register


@dataclass(frozen=True)
class FedAdagradConfig(FedOptConfig):
    name: ClassVar[str] = "fedadagrad"


class FedAdagrad(FedOpt):
    def second_moment(self, v, d, out):
        torch.addcmul(v, d, d, out=out)


register(FedAdagradConfig, FedAdagrad)
