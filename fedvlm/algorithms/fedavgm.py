"""FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification"): FedAvg with server momentum.

    v_t = beta v_{t-1} + d_t,   x_t = x_{t-1} + server_lr v_t          (v_0 = 0)

with d_t the aggregated delta. Defaults beta = 0.9, server_lr = 1.0. State: the momentum v per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedvlm.spec import AlgorithmSpec

from .base import Algorithm, register


@dataclass(frozen=True)
class FedAvgMConfig:
    server_lr: float = 1.0
    momentum: float = 0.9

    @classmethod
    def from_spec(cls, spec: AlgorithmSpec) -> FedAvgMConfig:
        return cls(server_lr=spec.server_lr, momentum=spec.server_momentum)


@register
class FedAvgM(Algorithm):
    name = "fedavgm"

    def __init__(self, spec: AlgorithmSpec) -> None:
        super().__init__(spec)
        self.config = FedAvgMConfig.from_spec(spec)

    def server_update(self, base, delta, state):
        out = {}
        for name, d in delta.items():
            v = state.get(f"v/{name}", torch.zeros_like(d)).double() * self.config.momentum + d
            state[f"v/{name}"] = v
            out[name] = (base[name].double() + self.config.server_lr * v).to(base[name].dtype)
        return out
