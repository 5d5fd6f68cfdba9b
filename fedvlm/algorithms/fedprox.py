"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks", MLSys).

Each site minimises its loss plus a proximal term (mu / 2) ||w - w_global||^2 over the trainable parameters, which
adds mu (w - w_global) to the gradient and keeps local models near the global under heterogeneous data. The server
step is FedAvg's. Default mu = 0.01. Nothing extra is sent and no state is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedvlm.tables import require

from .base import Algorithm, ClientHook
from .config import AlgorithmConfig
from .registry import register


@dataclass(frozen=True)
class FedProxConfig(AlgorithmConfig):
    name: ClassVar[str] = "fedprox"
    supports_lora_exact: ClassVar[bool] = True

    mu: float = 0.01  # proximal weight: each site's loss gains (mu / 2) ||w - w_global||^2

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.mu >= 0, "task.algorithm.mu", "must be >= 0")


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


class FedProx(Algorithm):
    config: FedProxConfig

    def client_hook(self, params, global_aux, client_state) -> ClientHook:
        return ProximalHook(params, self.config.mu)


register(FedProxConfig, FedProx)
