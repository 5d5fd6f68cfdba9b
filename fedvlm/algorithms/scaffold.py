"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML).

Control variates correct the client drift of local steps. The server keeps c, each site keeps c_i (zero at start).
On site i, starting from the global x, every local step uses the corrected gradient g_i(y) - c_i + c; after K
local steps at learning rate lr, ending at y_i, the option-II update of the paper's Algorithm 1 is

    c_i+ = c_i - c + (x - y_i) / (K lr),     sent with the update: dc_i = c_i+ - c_i

and the server, with S the round's sites and N all sites (`scaffold_clients`, 0 = |S|, full participation):

    x  <- x + server_lr * mean_{i in S}(y_i - x)
    c  <- c + (1 / N) sum_{i in S} dc_i

Wire: dc_i travels in the update as aux tensors ``fedvlm.aux/scaffold.dc/<name>``; c travels in the global as
``fedvlm.aux/scaffold.c/<name>`` (signed with it). State: c on the coordinator, c_i in the site's --state directory.
With an adaptive local optimizer (AdamW here) (x - y_i) / (K lr) is an estimate of the mean local gradient rather
than its exact value, as in FedVLMBench.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedvlm.spec import AlgorithmSpec

from .base import Algorithm, ClientHook, Tensors, register

DC = "scaffold.dc/"
C = "scaffold.c/"


@dataclass(frozen=True)
class ScaffoldConfig:
    server_lr: float = 1.0
    num_clients: int = 0  # N; 0 = the number of sites in each round

    @classmethod
    def from_spec(cls, spec: AlgorithmSpec) -> ScaffoldConfig:
        return cls(server_lr=spec.server_lr, num_clients=spec.scaffold_clients)


class ScaffoldHook(ClientHook):
    def __init__(self, params: Mapping[str, torch.nn.Parameter], c: Mapping[str, torch.Tensor],
                 c_i: Mapping[str, torch.Tensor]) -> None:
        super().__init__(params)
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        zeros = {n: torch.zeros_like(p, dtype=torch.float32, device="cpu") for n, p in self.params.items()}
        self.c = {n: c.get(n, zeros[n]).float() for n in self.params}
        self.c_i = {n: c_i.get(n, zeros[n]).float() for n in self.params}
        self.correction = {n: (self.c[n] - self.c_i[n]).to(p.device, p.dtype) for n, p in self.params.items()}

    def after_backward(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.add_(self.correction[name])

    def finish(self, steps: int, lr: float) -> tuple[Tensors, Tensors]:
        aux, state = {}, {}
        for name, p in self.params.items():
            if steps > 0:
                drift = (self.start[name] - p.detach()).float().cpu() / (steps * lr)
                new = self.c_i[name] - self.c[name] + drift
            else:
                new = self.c_i[name]
            aux[DC + name] = (new - self.c_i[name]).contiguous()
            state[name] = new.contiguous()
        return aux, state


@register
class Scaffold(Algorithm):
    name = "scaffold"

    def __init__(self, spec: AlgorithmSpec) -> None:
        super().__init__(spec)
        self.config = ScaffoldConfig.from_spec(spec)

    def server_update(self, base, delta, state):
        return {n: (base[n].double() + self.config.server_lr * d).to(base[n].dtype) for n, d in delta.items()}

    def server_aux(self, aux_mean, num_updates, state):
        n = self.config.num_clients or num_updates
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
