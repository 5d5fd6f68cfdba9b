"""Adaptive server optimizers (Reddi et al., 2021, "Adaptive Federated Optimization", ICLR), shared math.

With d_t the aggregated delta (the "pseudo-gradient", negated):

    m_t = beta1 m_{t-1} + (1 - beta1) d_t                       (m_0 = 0)
    v_t = second_moment(v_{t-1}, d_t)                           (v_0 = tau^2, as in the paper's Algorithm 2)
    x_t = x_{t-1} + eta m_t / (sqrt(v_t) + tau)

FedAdagrad, FedYogi and FedAdam differ only in `second_moment`. Defaults (as in FedVLMBench): eta = 1e-3,
tau = 1e-3, beta1 = 0.9, beta2 = 0.99. State: m and v per tensor. No bias correction (the paper has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedvlm.tables import require

from .base import Algorithm
from .config import AlgorithmConfig


@dataclass(frozen=True)
class FedOptConfig(AlgorithmConfig):
    """The keys of FedAdagrad / FedYogi / FedAdam (each subclasses this with its name)."""

    eta: float = 1e-3  # server learning rate
    tau: float = 1e-3  # adaptivity (epsilon)
    beta1: float = 0.9
    beta2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.eta > 0, "task.algorithm.eta", "must be > 0")
        require(self.tau > 0, "task.algorithm.tau", "must be > 0")
        require(0 <= self.beta1 < 1, "task.algorithm.beta1", "must be in [0, 1)")
        require(0 <= self.beta2 < 1, "task.algorithm.beta2", "must be in [0, 1)")


class FedOpt(Algorithm):
    """Base of FedAdagrad / FedYogi / FedAdam."""

    config: FedOptConfig

    def second_moment(self, v: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and d_t, as a new tensor (`v` is the stored state: not modified)."""
        raise NotImplementedError

    def server_update(self, base, delta, state):
        # Written with fused out-of-place ops (mul + add_, addcdiv_): about half the passes over memory of the
        # textbook expression, with no temporaries beyond m, v and the denominator (bench/aggregation_speed.py).
        c = self.config
        out = {}
        for name, d in delta.items():
            d = d.double()
            m_prev, v_prev = state.get(f"m/{name}"), state.get(f"v/{name}")
            m = d * (1 - c.beta1) if m_prev is None else torch.mul(m_prev.double(), c.beta1).add_(d, alpha=1 - c.beta1)
            v = self.second_moment(torch.full_like(d, c.tau ** 2) if v_prev is None else v_prev.double(), d)
            state[f"m/{name}"], state[f"v/{name}"] = m, v
            denom = v.sqrt().add_(c.tau)
            x = base[name].to(torch.float64, copy=True)  # a copy even when the base is float64: it is not modified
            out[name] = x.addcdiv_(m, denom, value=c.eta).to(base[name].dtype)
        return out
