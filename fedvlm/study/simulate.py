"""One trial in one process: N virtual clients, the same Learner, algorithm and aggregation as the real federation.

A round is what coordinator.rounds and client.agent do over the wire, without the wire:

    sample clients (``sample_clients``, the coordinator's rule) -> for each sampled client, in name order: switch
    the ONE resident model to the client's data (``Learner.use_data``), run the site's round step
    (``Learner.federated_round``, as the agent does: global in, update + aux + client state out) ->
    ``algorithm.aggregate`` -> ``next_global``.

Global 0 is the adapter of a fresh Learner built from the trial's spec (what the real INIT site uploads). Bytes
sent each way are the sizes of the safetensors files that would cross the wire. Baselines: ``centralized`` trains
one client on the union of the sites' data; ``local`` trains every client on its own data only, never aggregating.

Stragglers: a simulated clock advances by each round's length, ``steps x step_seconds`` of its slowest client
(stragglers ``straggler_slowdown`` times slower). With a ``round_deadline``, an update later than it is refused as
the coordinator refuses it (its training is wasted, no bytes go up) and the round lasts the deadline; with fewer
than ``quorum`` updates the global stays unchanged (the coordinator would sample again; here the round number
advances, so every trial has the same number of rounds).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedvlm import adapters
from fedvlm.algorithms import build
from fedvlm.algorithms.base import ClientUpdate, Tensors, next_global, sample_clients, split_aux
from fedvlm.algorithms.privacy import Sampling, budget_refusal
from fedvlm.study.config import BenchConfig
from fedvlm.study.data import SiteData

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class TrialResult:
    final_metrics: dict[str, float]
    global_state: Tensors  # the last global (adapter + aux), or the centralized model's adapter
    bytes_up: int
    bytes_down: int
    seconds: float
    stop_reason: str = ""  # why it ended before its last round (a dp_max_epsilon reached, as the coordinator says)


def client_names(n: int) -> list[str]:
    """Virtual client names, in the order the coordinator aggregates them (by name)."""
    width = len(str(n))
    return [f"site-{i + 1:0{width}d}" for i in range(n)]


def straggler_set(names: list[str], fraction: float, seed: int) -> set[str]:
    """The slow clients of a trial: ``round(fraction * N)`` of them, drawn with the trial's seed."""
    return set(random.Random(f"stragglers-{seed}").sample(names, round(fraction * len(names))))


def run_trial(config: BenchConfig, seed: int, data: SiteData, out: Path, progress: Progress | None = None,
              cache_dir: Path | None = None) -> TrialResult:
    """Run one (config, seed) trial; writes ``rounds.jsonl`` and ``clients.jsonl`` under ``out``."""
    from fedvlm.learner import Learner

    exp = config.experiment
    spec = config.for_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    rounds_log = (out / "rounds.jsonl").open("w", encoding="utf-8")
    clients_log = (out / "clients.jsonl").open("w", encoding="utf-8")
    started = time.monotonic()
    names = client_names(exp.num_clients)
    site_of = dict(zip(names, data.sites, strict=True))
    per_round = 1 if exp.baseline == "centralized" else (
        exp.num_clients if exp.baseline == "local" else exp.sampled_per_round)
    total = exp.rounds * per_round
    done = 0

    def tick(what: str) -> None:
        if progress is not None:
            progress(done, total, what)

    tick("building the model")
    learner = Learner(spec, data.union if exp.baseline == "centralized" else data.sites[0], cache_dir=cache_dir)
    rank_of = config.site_ranks(names)
    learners = {spec.lora.r: learner}  # one resident model per site-local LoRA rank (experiment.site_lora_ranks)
    for rank in sorted(set(rank_of.values()) - set(learners)):
        learners[rank] = Learner(spec, data.sites[0], cache_dir=cache_dir, lora_rank=rank)
    sampling = Sampling(exp.num_clients, exp.sampled_per_round)  # for the DP accountant: every virtual site is live
    global_state: Tensors = learner.adapter_state()  # global 0: the INIT site's fresh adapter
    algorithm = build(spec.algorithm)
    server_state = algorithm.initial_state(global_state)
    local_states: dict[str, Tensors] = {name: dict(global_state) for name in names}
    client_states: dict[str, Tensors] = {name: {} for name in names}
    slow = straggler_set(names, exp.stragglers, seed)
    bytes_up = bytes_down = 0
    clock = 0.0  # the simulated clock (seconds): client steps x step_seconds, rounds closed at the deadline
    final: dict[str, float] = {}
    scored = 0  # the round of the global `final` scores
    stop_reason = ""
    try:
        for rnd in range(1, exp.rounds + 1):
            round_started = time.monotonic()
            if exp.baseline == "federated":  # the coordinator's check before it draws a round (rounds.py)
                stop_reason = budget_refusal(algorithm.config, server_state, sampling, rnd)
                if stop_reason:
                    if scored < rnd - 1:  # the trial ends with the last released global: its metrics are final
                        tick(f"round {rnd - 1}/{exp.rounds}: evaluating")
                        final = _evaluate(learner, exp.baseline, global_state, local_states, names, data.eval_json,
                                          rnd - 1)
                    break
            if exp.baseline == "centralized":
                sampled = ["union"]
            elif exp.baseline == "local":
                sampled = list(names)
            else:
                sampled = sample_clients(f"bench-{exp.name}-{seed}", rnd, 0, names, exp.sampled_per_round)
            base, _ = split_aux(global_state)
            global_bytes = len(adapters.to_bytes(global_state)) if exp.baseline == "federated" else 0
            updates: list[ClientUpdate] = []
            round_up = 0
            late: list[str] = []
            times: list[float] = []
            for name in sampled:
                tick(f"round {rnd}/{exp.rounds}: {name}")
                if exp.baseline == "federated":
                    site_learner = learners[rank_of[name]]
                    site_learner.use_data(site_of[name])
                    step = site_learner.federated_round(global_state, rnd, exp.rounds, client_states[name])
                    result = step.result
                else:
                    learner.use_data(data.union if name == "union" else site_of[name])
                    learner.load_global_state(local_states[name] if exp.baseline == "local" else base, rnd)
                    result = learner.train_round(rnd, total_rounds=exp.rounds)
                sim = result.steps * exp.step_seconds * (exp.straggler_slowdown if name in slow else 1.0)
                times.append(sim)
                record = {"round": rnd, "client": name, "num_examples": result.num_examples, "steps": result.steps,
                          "loss_first": result.loss_first, "loss_last": result.loss_last,
                          "seconds": round(result.seconds, 3), "sim_seconds": round(sim, 6)}
                if exp.baseline == "federated" and 0 < exp.round_deadline < sim:
                    late.append(name)  # the coordinator refuses an update after the deadline: trained for nothing
                    record.update(late=True, bytes_up=0, bytes_down=global_bytes)
                elif exp.baseline == "federated":
                    client_states[name] = step.client_state
                    size = len(adapters.to_bytes(step.wire_tensors()))
                    round_up += size
                    record.update(bytes_up=size, bytes_down=global_bytes)
                    updates.append(ClientUpdate(float(result.num_examples), lambda s=step: (s.update, s.aux)))
                else:
                    local_states[name] = learner.adapter_state()
                clients_log.write(json.dumps(record, sort_keys=True) + "\n")
                done += 1
            server_metrics: dict[str, float] = {}
            clock += exp.round_deadline if late else max(times, default=0.0)
            aggregated = exp.baseline != "federated" or len(updates) >= exp.quorum
            if exp.baseline == "federated":
                bytes_up += round_up
                bytes_down += global_bytes * len(sampled)
            if exp.baseline == "federated" and aggregated:
                result = algorithm.aggregate(base, updates, server_state, rnd, sampling)
                server_state = result.state
                server_metrics = result.metrics
                # Compact copies: a server step may return views of its float64 delta's memory (slices.plus),
                # twice a float32 global's bytes, and this global is kept for a whole round.
                global_state = {n: t.clone() for n, t in next_global(base, result).items()}
            elif exp.baseline == "centralized":
                global_state = local_states["union"]
            evaluate = rnd % exp.eval_every == 0 or rnd == exp.rounds
            metrics: dict[str, float] = {}
            if evaluate:
                tick(f"round {rnd}/{exp.rounds}: evaluating")
                metrics = _evaluate(learner, exp.baseline, global_state, local_states, names, data.eval_json, rnd)
                final, scored = metrics, rnd
            rounds_log.write(json.dumps({
                "round": rnd, "sampled": sampled, "late": late, "aggregated": aggregated, "metrics": metrics,
                "server_metrics": server_metrics, "bytes_up": round_up,
                "bytes_down": global_bytes * len(sampled) if exp.baseline == "federated" else 0,
                "sim_clock": round(clock, 6), "seconds": round(time.monotonic() - round_started, 3)},
                sort_keys=True) + "\n")
            rounds_log.flush()
            clients_log.flush()
    finally:
        rounds_log.close()
        clients_log.close()
    tick("done")
    return TrialResult(final, global_state, bytes_up, bytes_down, time.monotonic() - started, stop_reason)


def _evaluate(learner, baseline: str, global_state: Tensors, local_states: dict[str, Tensors], names: list[str],
              eval_json: Path, rnd: int) -> dict[str, float]:
    """Every model is scored on the same common evaluation set; ``local``: the mean over the clients' models."""
    if baseline != "local":
        learner.load_global_state(global_state, rnd)  # aux included: FLoRA's stack is merged for the evaluation
        return learner.evaluate_json(eval_json)
    scores = []
    for name in names:
        learner.load_global_state(local_states[name], rnd)
        scores.append(learner.evaluate_json(eval_json))
    keys = sorted(set.intersection(*(set(s) for s in scores)))
    return {k: sum(s[k] for s in scores) / len(scores) for k in keys}
