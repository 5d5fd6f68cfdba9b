"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification"): FedAvg with server momentum.

    v_t = beta v_{t-1} + d_t,   x_t = x_{t-1} + server_lr v_t          (v_0 = 0)

with d_t the aggregated delta. Defaults beta = 0.9, server_lr = 1.0. State: the momentum v per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fedvlm.tables import require

from .base import Algorithm
from .config import AlgorithmConfig
from .registry import register


@dataclass(frozen=True)
class FedAvgMConfig(AlgorithmConfig):
    name: ClassVar[str] = "fedavgm"

    server_lr: float = 1.0  # global step size
    server_momentum: float = 0.9  # beta

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.server_lr > 0, "task.algorithm.server_lr", "must be > 0")
        require(0 <= self.server_momentum < 1, "task.algorithm.server_momentum", "must be in [0, 1)")


class FedAvgM(Algorithm):
    config: FedAvgMConfig

    def server_update(self, base, delta, state):
        out = {}
        for name, d in delta.items():
            v = state.get(f"v/{name}", torch.zeros_like(d)).double() * self.config.server_momentum + d
            state[f"v/{name}"] = v
            out[name] = (base[name].double() + self.config.server_lr * v).to(base[name].dtype)
        return out


register(FedAvgMConfig, FedAvgM)
