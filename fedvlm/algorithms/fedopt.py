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

from . import slices
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

    def second_moment(self, v: torch.Tensor, d: torch.Tensor, out: torch.Tensor) -> None:
        """Write v_t, from v_{t-1} and d_t, into `out` (`v` is the stored state or a buffer: not modified)."""
        raise NotImplementedError

    def server_update(self, base, delta, state):
        # Fused ops (mul + add_, addcmul_, addcdiv_) applied a slice at a time (slices.py), m written over the delta
        # (the step's own): the only new tensors the size of the model are v and the new values, i.e. fewer passes
        # and page faults (bench/aggregation_speed.py).
        c = self.config
        scratch = slices.Scratch(2)
        out = {}
        for name, delta_tensor in delta.items():
            m_prev, v_prev = state.get(f"m/{name}"), state.get(f"v/{name}")
            x_prev = base[name]
            slices.check_shape(delta_tensor, x_prev, "delta")
            d = delta_tensor.double().reshape(-1)
            m_prev = None if m_prev is None else m_prev.double().reshape(-1)
            v_prev = None if v_prev is None else v_prev.double().reshape(-1)
            v = torch.empty_like(d)
            x = torch.empty(x_prev.shape, dtype=x_prev.dtype)
            flat_x, flat_base = x.view(-1), x_prev.reshape(-1)
            for part, (a, b) in scratch.slices(d.numel()):
                d_part, v_part = d[part], v[part]
                self.second_moment(a.fill_(c.tau ** 2) if v_prev is None else v_prev[part], d_part, v_part)
                if m_prev is None:
                    torch.mul(d_part, 1 - c.beta1, out=b)
                else:
                    torch.mul(m_prev[part], c.beta1, out=b).add_(d_part, alpha=1 - c.beta1)
                m_part = d_part.copy_(b)  # d_t is used up: its slice now holds m_t
                torch.sqrt(v_part, out=a).add_(c.tau)  # the denominator
                b.copy_(flat_base[part]).addcdiv_(m_part, a, value=c.eta)
                flat_x[part].copy_(b)
            state[f"m/{name}"], state[f"v/{name}"] = d.view(delta_tensor.shape), v.view(delta_tensor.shape)
            out[name] = x
        return out
