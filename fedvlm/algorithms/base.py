"""The interface every federated optimisation algorithm implements (an algorithm module subclasses `Algorithm`
and registers it with its config, registry.py).

A round on the server is one pipeline, the same for every algorithm:

    deltas d_k = y_k - x          (y_k: site k's adapter after local training, x: the round's base global)
    d = combine(d_1..d_K)         (aggregation.py: weighted mean, or a robust aggregator; optional clipping, DP)
    x', state' = server_update(x, d, state)   (the algorithm: plain step, momentum, adaptive moments, ...)

and on a site one hook inside the local loop (`ClientHook`): an extra loss term, a gradient correction, and extra
tensors to send with the update. Extra tensors travel in the same safetensors file as the adapter under the
reserved prefix ``fedvlm.aux/`` (`AUX_PREFIX`); the coordinator checks them against `Algorithm.expected_aux`.

Server state (moments, control variates, DP accounting) is a flat dict of named tensors that the caller persists
between rounds; algorithms are pure functions of (base, updates, state) with no I/O.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .config import AlgorithmConfig
from .slices import Scratch, plus

if TYPE_CHECKING:
    from .privacy import Sampling

Tensors = dict[str, torch.Tensor]

AUX_PREFIX = "fedvlm.aux/"


def split_aux(tensors: Mapping[str, torch.Tensor]) -> tuple[Tensors, Tensors]:
    """(adapter tensors, auxiliary tensors with the prefix removed)."""
    adapter = {k: v for k, v in tensors.items() if not k.startswith(AUX_PREFIX)}
    aux = {k[len(AUX_PREFIX):]: v for k, v in tensors.items() if k.startswith(AUX_PREFIX)}
    return adapter, aux


def with_aux(adapter: Mapping[str, torch.Tensor], aux: Mapping[str, torch.Tensor]) -> Tensors:
    """One dict for the wire: the adapter tensors plus `aux` under `AUX_PREFIX`."""
    out = dict(adapter)
    out.update({AUX_PREFIX + k: v for k, v in aux.items()})
    return out


@dataclass(frozen=True)
class ClientUpdate:
    """One accepted site update: its weight (example count) and a loader of (adapter tensors, aux tensors).

    Loading is deferred so that streaming aggregators hold a bounded number of updates in memory, whatever K.
    """

    weight: float
    load: Callable[[], tuple[Tensors, Tensors]]


@dataclass
class ServerResult:
    """A server step's output: new values of the round's tensors, aux tensors to publish with the global, the new
    server state, and scalar metrics (e.g. the DP epsilon spent so far)."""

    tensors: Tensors
    aux: Tensors = field(default_factory=dict)
    state: Tensors = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class ClientHook:
    """What an algorithm adds to the local loop; this base adds nothing (FedAvg).

    ``params`` maps adapter tensor names (as in the update) to the model's trainable parameters.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter]) -> None:
        self.params = dict(params)

    def loss_term(self) -> torch.Tensor | None:
        """Added to the training loss at every step (None: nothing)."""
        return None

    def after_backward(self) -> None:
        """Called after ``loss.backward()`` and before clipping and the optimizer step: may edit ``.grad``."""

    def finish(self) -> tuple[Tensors, Tensors]:
        """After the last step: (aux tensors to send with the update, new client state to keep on the site)."""
        return {}, {}


class Algorithm:
    """Base of every algorithm: FedAvg's server step (x + d) and a no-op client hook, configured by `config` (the
    algorithm's own `AlgorithmConfig` subclass)."""

    def __init__(self, config: AlgorithmConfig) -> None:
        self.config = config

    # -- server ------------------------------------------------------------------------------------------------
    def initial_state(self, base: Mapping[str, torch.Tensor]) -> Tensors:
        """Server state before round 1 (algorithms that need moments create them lazily)."""
        from .aggregation import initial_dp_state

        return initial_dp_state(self.config)

    def aggregate(self, base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                  state: Mapping[str, torch.Tensor], round_index: int,
                  sampling: Sampling | None = None) -> ServerResult:
        """The new global values of the round's tensors from `base` and the round's `updates`; `sampling`: how the
        round's sites were drawn, for the DP accountant (None: no amplification by sampling).

        Deterministic for equal inputs (float64 math, updates in the given order, DP noise seeded from the state),
        so an interrupted aggregation that is redone gives the same global.
        """
        from .aggregation import combine

        new_state = dict(state)
        delta, aux_mean, metrics = combine(self.config, base, updates, new_state, round_index, sampling)
        tensors = self.server_update(base, delta, new_state)
        aux = self.server_aux(aux_mean, len(updates), new_state)
        if self.config.lora_aggregation == "flora":  # the stack travels with the global (lora_aggregation.py)
            from .lora_aggregation import published_stack

            aux.update(published_stack(new_state))
        return ServerResult(tensors=tensors, aux=aux, state=new_state, metrics=metrics)

    def server_update(self, base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                      state: Tensors) -> Tensors:
        """x' = x + d (in float64, returned in the base's dtype); may read and update `state` in place, and may
        overwrite `delta`, which is the step's own."""
        scratch = Scratch(1)
        return {n: plus(base[n], d, scratch) for n, d in delta.items()}

    def server_aux(self, aux_mean: Mapping[str, torch.Tensor], num_updates: int, state: Tensors) -> Tensors:
        """Aux tensors published with the new global (none by default)."""
        return {}

    # -- wire --------------------------------------------------------------------------------------------------
    def expected_aux(self, names: Iterable[str]) -> dict[str, str]:
        """Aux tensor name -> the adapter tensor whose shape and dtype it must have, for an update carrying
        `names`. The coordinator refuses an update whose aux tensors differ from this."""
        return {}

    # -- client ------------------------------------------------------------------------------------------------
    def client_hook(self, params: Mapping[str, torch.nn.Parameter], global_aux: Mapping[str, torch.Tensor],
                    client_state: Mapping[str, torch.Tensor]) -> ClientHook:
        """The hook for one local round starting from the current values of `params` (= the global)."""
        return ClientHook(params)


def next_global(base: Mapping[str, torch.Tensor], result: ServerResult) -> Tensors:
    """The round's new global as published: the base with the server step's tensors replaced (tensors no update
    carries, e.g. a frozen F-2stage part, keep the base's values) plus the aux tensors under `AUX_PREFIX`.

    The one rule shared by the coordinator (coordinator.rounds) and the in-process benchmark (fedvlm.study)."""
    merged = dict(base)
    merged.update(result.tensors)
    return with_aux(merged, result.aux)


def sample_clients(run_id: str, round_index: int, attempt: int, candidates: Sequence[str], need: int) -> list[str]:
    """The sites asked to train round `round_index`: `need` of `candidates` (in name order) drawn by a generator
    seeded with (run, round, attempt), sorted. Shared by the coordinator and the in-process benchmark."""
    rng = random.Random(f"{run_id}:{round_index}:{attempt}")
    return sorted(rng.sample(list(candidates), need))

