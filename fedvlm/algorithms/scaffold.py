"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML).

Control variates correct the client drift of local steps. The server keeps c, each site keeps c_i (zero at start).
On site i, starting from the global x, every local step uses the corrected gradient g_i(y) - c_i + c. The site's
new control variate is its mean local gradient over the round's K steps (the raw g_i(y_k), before correction and
clipping), an along-the-trajectory estimate of the paper's option I (the local gradient at x):

    c_i+ = (1 / K) sum_k g_i(y_k),     sent with the update: dc_i = c_i+ - c_i

and the server, with S the round's sites, N all sites (`scaffold_clients`, 0 = |S|, full participation) and p_i
the weights of the round's mean (n_i / sum_S n_j, the example counts; equal weights under central DP or a robust
aggregator, which ignore the counts):

    x  <- x + server_lr * sum_{i in S} p_i (y_i - x)
    c  <- c + (|S| / N) sum_{i in S} p_i dc_i

Both steps use the same weights, so SCAFFOLD minimises the objective FedAvg targets, sum_i n_i f_i / sum_i n_i (the
example-weighted one; the unweighted mean of f_i under DP or a robust aggregator). With the model step weighted
and c unweighted (as before), c estimated the unweighted mean gradient and x converged to the unweighted optimum.
With partial participation (|S| < N), p_i re-weights within the round's sample (an estimate of the sites' share).

Why not option II, c_i+ = c_i - c + (x - y_i) / (K lr): it measures the gradient only when the local optimizer is
plain SGD. fedvlm trains with AdamW, whose steps are about lr per coordinate whatever the gradient's size, so option
II made c_i of order 1 while the adapters' gradients are of order 1e-3; the correction then swamped the gradients
and the model never learned (accuracy 0 in the first run of benchmark suite 2, docs/benchmark.md). The mean
gradient is in gradient units for any optimizer, and x* stays a fixed point: at the optimum every site's corrected
gradient is g_i(y) - g_i(x*) + 0.

Wire: dc_i travels in the update as aux tensors ``fedvlm.aux/scaffold.dc/<name>``; c travels in the global as
``fedvlm.aux/scaffold.c/<name>`` (signed with it). State: c on the coordinator, c_i in the site's --state directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedvlm.tables import require

from .base import Algorithm, ClientHook, ClientUpdate, Tensors
from .config import AlgorithmConfig
from .registry import register

DC = "scaffold.dc/"
C = "scaffold.c/"


@dataclass(frozen=True)
class ScaffoldConfig(AlgorithmConfig):
    name: ClassVar[str] = "scaffold"
    supports_secure_aggregation: ClassVar[bool] = False  # its control variates are averaged apart from the deltas

    server_lr: float = 1.0  # global step size
    scaffold_clients: int = 0  # N, all sites of the federation; 0 = the sites of each round (full participation)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.server_lr > 0, "task.algorithm.server_lr", "must be > 0")
        require(self.scaffold_clients >= 0, "task.algorithm.scaffold_clients", "must be >= 0")


class ScaffoldHook(ClientHook):
    def __init__(self, params: Mapping[str, torch.nn.Parameter], c: Mapping[str, torch.Tensor],
                 c_i: Mapping[str, torch.Tensor]) -> None:
        super().__init__(params)
        zeros = {n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in self.params.items()}
        self.c = {n: c.get(n, zeros[n]).float() for n in self.params}
        self.c_i = {n: c_i.get(n, zeros[n]).float() for n in self.params}
        self.correction = {n: (self.c[n] - self.c_i[n]).to(p.device, p.dtype) for n, p in self.params.items()}
        self.grad_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.grad_steps = 0

    def after_backward(self) -> None:
        self.grad_steps += 1
        for name, p in self.params.items():
            if p.grad is not None:
                self.grad_sum[name].add_(p.grad.float())  # the raw local gradient, before the correction
                p.grad.add_(self.correction[name])

    def finish(self) -> tuple[Tensors, Tensors]:
        aux, state = {}, {}
        for name in self.params:
            new = (self.grad_sum[name].cpu() / self.grad_steps) if self.grad_steps else self.c_i[name]
            aux[DC + name] = (new - self.c_i[name]).contiguous()
            state[name] = new.contiguous()
        return aux, state


class Scaffold(Algorithm):
    config: ScaffoldConfig

    def aggregate(self, base, updates, state, round_index, sampling=None):
        # The combination averages aux tensors without weights (aggregation.combine); scaling update i's dc_i by
        # K p_i makes that mean sum_i p_i dc_i, with the weights of the model step's mean.
        equal = self.config.dp_noise_multiplier > 0 or self.config.aggregator != "mean"
        weights = [1.0 if equal else float(u.weight) for u in updates]
        total = sum(weights)
        scaled = [ClientUpdate(u.weight, _scaled_aux(u.load, w * len(updates) / total))
                  for u, w in zip(updates, weights, strict=True)]
        return super().aggregate(base, scaled, state, round_index, sampling)

    def server_update(self, base, delta, state):
        return {n: (base[n].double() + self.config.server_lr * d).to(base[n].dtype) for n, d in delta.items()}

    def server_aux(self, aux_mean, num_updates, state):
        n = self.config.scaffold_clients or num_updates
        for key, dc in aux_mean.items():
            name = key[len(DC):]
            c = state.get(f"c/{name}", torch.zeros_like(dc)).double()
            state[f"c/{name}"] = c + dc.double() * (num_updates / n)  # (1/N) sum = (|S|/N) mean
        return {C + k[2:]: v.float() for k, v in sorted(state.items()) if k.startswith("c/")}

    def expected_aux(self, names: Iterable[str]) -> dict[str, str]:
        return {DC + n: n for n in names}

    def client_hook(self, params, global_aux, client_state) -> ClientHook:
        c = {k[len(C):]: v for k, v in global_aux.items() if k.startswith(C)}
        return ScaffoldHook(params, c, client_state)


def _scaled_aux(load, factor: float):
    def scaled():
        tensors, aux = load()
        return tensors, {n: v * factor for n, v in aux.items()}
    return scaled


register(ScaffoldConfig, Scaffold)
