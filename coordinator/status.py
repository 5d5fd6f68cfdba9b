"""What `fedvlm-coord status` shows: a snapshot of the state database, as the fedvlm.v1.FederationStatus document.

`snapshot` builds the message's fields as a dict; `document` makes the one plain document that `status --json`
prints, the Admin RPC serves and the dashboard and Prometheus read, whether the coordinator is live or stopped
(the schema is admin.proto's FederationStatus, documented in docs/operations.md). fedvlm.status_view renders it.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format

from fedvlm.wire.plain import message_to_plain
from fedvlm.wire.v1 import admin_pb2

from .layout import FederationDir
from .runs import config_notice
from .secagg_phase import progress as secagg_progress
from .state import Activity, AssignmentState, MetricsKind, RoundPhase, Run, RunState, State

# What a site last reported stays true after it stops polling: it finished the run, or it stopped on an error.
FINAL_ACTIVITIES = (Activity.DONE, Activity.FAILED)


def weighted_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Example-weighted mean of per-site metric dicts, key by key, over the sites that report the key.

    A key "task/metric" (multi-task runs) is weighted by that site's "task/num_examples", any other key by its
    "num_examples" (default 1); the result carries the summed counts under the same names.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("num_examples"):
                continue
            count_key = f"{key.rsplit('/', 1)[0]}/num_examples" if "/" in key else "num_examples"
            weight = row.get(count_key, row.get("num_examples", 1.0))
            sums[key] = sums.get(key, 0.0) + value * weight
            weights[key] = weights.get(key, 0.0) + weight
    out = {key: sums[key] / weights[key] for key in sorted(sums) if weights[key] > 0}
    for key in {k for row in rows for k in row if k.endswith("num_examples")}:
        out[key] = sum(row.get(key, 0.0) for row in rows)
    return out


def snapshot(state: State, live: bool, fed: FederationDir | None = None, run: Run | None = None) -> dict[str, Any]:
    """The federation now, as FederationStatus fields: the run (`run`, else the current one), its round, phase,
    deadline and quorum, every site, every global version of the run, every run; with `fed`, whether its
    federation.toml still says what the current run uses."""
    now = state.now()
    current = state.current_run()
    run = run or current
    out: dict[str, Any] = {"federation_id": state.federation_id() or "", "now_unix": now, "live": live,
                           "clients": [], "rounds": [], "runs": [_run_summary(state, r) for r in state.runs()]}
    if fed is not None:
        out["config_notice"] = config_notice(fed, current)
    assigned: dict[str, AssignmentState] = {}
    if run:
        assigned = state.assignments(run.run_id, run.round)
        out.update(run_id=run.run_id, run_number=run.number, run_state=run.state.value,
                   stop_reason=run.stop_reason or "", total_rounds=run.config.rounds, quorum=run.config.quorum,
                   rounds=_rounds(state, run.run_id), **_progress(state, run, assigned))
    timeout = run.config.heartbeat_timeout if run else 60.0
    uploads = {u.client: u for u in state.uploads(run.run_id, run.round)} if run else {}
    trained = _latest_training(state, run.run_id) if run else {}
    for client in state.clients():
        name = client.name
        shown, done, total = client.activity.value, client.bytes_done, client.bytes_total
        if client.revoked:
            shown = "revoked"
        elif client.activity in FINAL_ACTIVITIES and (client.activity is Activity.FAILED or run is None
                                                      or client.run_id in (None, run.run_id)):
            pass  # a site that finished this run or stopped on an error says so, however long ago that was
        elif client.last_seen is None or now - client.last_seen > timeout:
            shown = "offline"
        elif assigned.get(name) is AssignmentState.LATE:
            shown = "late"
        if name in uploads and shown == Activity.UPLOADING:
            done, total = max(done, uploads[name].received), uploads[name].size
        training = shown == Activity.TRAINING
        train = trained.get(name)
        out["clients"].append({
            "name": name, "state": shown, "detail": client.detail, "bytes_done": done, "bytes_total": total,
            "last_heartbeat_unix": client.last_seen or 0.0, "last_metrics": client.last_metrics,
            "sampled": name in assigned, "step": client.step if training else 0,
            "steps_total": client.steps_total if training else 0,
            "train_seconds": train.metrics.get("seconds", 0.0) if train else 0.0,
            "train_steps": int(train.metrics.get("steps", 0)) if train else 0,
            "train_round": train.round if train else 0,
        })
    return out


def document(status: dict[str, Any] | admin_pb2.FederationStatus) -> dict[str, Any]:
    """The FederationStatus document: every field present, integers as integers, the same from either source."""
    if isinstance(status, dict):
        status = status_message(status)
    return message_to_plain(status)


def status_message(status: dict[str, Any]) -> admin_pb2.FederationStatus:
    """`snapshot`'s dict as the FederationStatus message. A non-finite metric (an infinite DP epsilon, or a value an
    older fedvlm stored) is passed in the spelling protobuf's JSON mapping takes for it ("NaN", "Infinity")."""
    def spelled(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, dict):
            return {k: spelled(v) for k, v in value.items()}
        if isinstance(value, list):
            return [spelled(v) for v in value]
        return value

    return json_format.ParseDict(spelled(status), admin_pb2.FederationStatus())


def local_document(state: State, fed: FederationDir | None = None, run: Run | None = None,
                   live: bool = False) -> dict[str, Any]:
    """`document(snapshot(...))`: the status document straight from a state database."""
    return document(snapshot(state, live, fed, run))


def _progress(state: State, run: Run, assigned: dict[str, AssignmentState]) -> dict[str, Any]:
    """Round k of N, phase, deadline and updates so far, true in every phase of the run."""
    rnd = state.round(run.run_id, run.round)
    accepted = sum(1 for s in assigned.values() if s is AssignmentState.ACCEPTED)
    out: dict[str, Any] = {"round": run.round, "sampled": len(assigned), "accepted": accepted, "deadline_unix": 0.0}
    if run.state is RunState.INIT:
        return {**out, "round": 0, "phase": "init"}
    if run.state in (RunState.DONE, RunState.STOPPED):
        return {**out, "round": min(run.round, run.config.rounds), "phase": run.state.value}
    if run.state is RunState.EVALUATING:  # the round after the last: the sites score the final global
        reported = {m.client for m in state.metrics(run.run_id, MetricsKind.EVAL, run.round - 1)}
        return {**out, "round": run.round - 1, "phase": "final evaluation", "accepted": len(reported & set(assigned)),
                "deadline_unix": (rnd.deadline or 0.0) if rnd else 0.0}
    phase = rnd.phase if rnd else RoundPhase.WAITING
    secure = secagg_progress(state, run, rnd) if phase is RoundPhase.TRAINING else {}
    return {**out, "phase": phase.value, **({"secure_aggregation": secure} if secure else {}),
            "deadline_unix": (rnd.deadline or 0.0) if rnd and phase is RoundPhase.TRAINING else 0.0}


def _latest_training(state: State, run_id: str):
    """Site -> its latest "train" metrics report in the run (seconds and steps of its local round)."""
    latest = {}
    for report in sorted(state.metrics(run_id, MetricsKind.TRAIN), key=lambda r: (r.round, r.reported_at)):
        latest[report.client] = report
    return latest


def _run_summary(state: State, run: Run) -> dict[str, Any]:
    globals_ = state.globals(run.run_id)
    task = run.task
    return {"number": run.number, "run_id": run.run_id, "state": run.state.value,
            "rounds_done": max(0, len(globals_) - 1), "total_rounds": run.config.rounds, "model": task.model,
            "strategy": task.strategy, "algorithm": task.algorithm.name, "created_unix": run.created_at,
            "finished_unix": run.finished_at or 0.0, "stop_reason": run.stop_reason or "",
            "config_source": run.config_source}


def _rounds(state: State, run_id: str) -> list[dict[str, Any]]:
    evals: dict[int, list[dict[str, float]]] = {}
    for report in state.metrics(run_id, MetricsKind.EVAL):
        evals.setdefault(report.round, []).append(report.metrics)
    server = {report.round: report.metrics for report in state.metrics(run_id, MetricsKind.SERVER)}
    training: dict[int, list[dict[str, Any]]] = {}  # one report per site and round (a later one replaces it)
    for report in sorted(state.metrics(run_id, MetricsKind.TRAIN), key=lambda r: r.client):
        training.setdefault(report.round, []).append({"client": report.client, "steps": int(report.metrics.get(
            "steps", 0)), "seconds": report.metrics.get("seconds", 0.0)})
    counts = state.update_counts(run_id)
    rows = []
    for g in state.globals(run_id):
        rnd = state.round(run_id, g.round)
        rows.append({"round": g.round, "phase": "done", "global_digest": g.digest, "global_bytes": g.size,
                     "num_updates": counts.get(g.round, 0) if g.round else 0,
                     "eval_metrics": weighted_metrics(evals.get(g.round, [])),
                     "server_metrics": server.get(g.round, {}),
                     "training": training.get(g.round, []),
                     "started_unix": rnd.started_at if rnd else g.created_at, "finished_unix": g.created_at})
    return rows
