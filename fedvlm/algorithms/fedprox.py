"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

Each site minimises its loss plus a proximal term (mu / 2) ||w - w_global||^2 over the trainable parameters, which
adds mu (w - w_global) to the gradient and keeps local models near the global under heterogeneous data. The server
step is FedAvg's. Default mu = 0.01. Nothing extra is sent and no state is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedvlm.spec import AlgorithmSpec

from .base import Algorithm, ClientHook, register


@dataclass(frozen=True)
class FedProxConfig:
    mu: float = 0.01

    @classmethod
    def from_spec(cls, spec: AlgorithmSpec) -> FedProxConfig:
        return cls(mu=spec.mu)


class ProximalHook(ClientHook):
    """Adds (mu / 2) ||w - w_global||^2, with w_global the parameters' values when the hook is made."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], mu: float) -> None:
        super().__init__(params)
        self.mu = mu
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def loss_term(self) -> torch.Tensor | None:
        if self.mu == 0 or not self.params:
            return None
        total = sum((p - self.anchor[n]).square().sum() for n, p in self.params.items())
        return 0.5 * self.mu * total


@register
class FedProx(Algorithm):
    name = "fedprox"

    def __init__(self, spec: AlgorithmSpec) -> None:
        super().__init__(spec)
        self.config = FedProxConfig.from_spec(spec)

    def client_hook(self, params, global_aux, client_state) -> ClientHook:
        return ProximalHook(params, self.config.mu)
