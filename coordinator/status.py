"""What `fedvlm-coord status` shows: a snapshot of the state database as plain data.

The snapshot's keys are the field names of fedvlm.v1.FederationStatus, so the same dict is served by the Admin
RPC (live coordinator) and read straight from state.db (coordinator stopped); fedvlm.status_view renders it.
"""

from __future__ import annotations

from typing import Any

from .state import Activity, AssignmentState, MetricsKind, RoundPhase, State


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


def snapshot(state: State, live: bool) -> dict[str, Any]:
    """The federation's state now: run, round, phase, deadline, quorum, every client, every global version."""
    now = state.now()
    out: dict[str, Any] = {"federation_id": state.federation_id() or "", "now_unix": now, "live": live,
                           "clients": [], "rounds": []}
    run = state.current_run()
    timeout = run.config.heartbeat_timeout if run else 60.0
    rnd = state.round(run.run_id, run.round) if run else None
    assigned = state.assignments(run.run_id, run.round) if run else {}
    if run:
        out.update(run_id=run.run_id, run_state=run.state.value, round=run.round, total_rounds=run.config.rounds,
                   quorum=run.config.quorum, sampled=len(assigned),
                   accepted=sum(1 for s in assigned.values() if s is AssignmentState.ACCEPTED))
        if rnd:
            out.update(phase="final evaluation" if rnd.phase is RoundPhase.EVALUATING else rnd.phase.value,
                       deadline_unix=rnd.deadline or 0.0)
    uploads = {u.client: u for u in state.uploads(run.run_id, run.round)} if run else {}
    for client in state.clients():
        name = client.name
        shown, done, total = client.activity.value, client.bytes_done, client.bytes_total
        if client.revoked:
            shown = "revoked"
        elif client.last_seen is None or now - client.last_seen > timeout:
            shown = "offline"
        elif assigned.get(name) is AssignmentState.LATE:
            shown = "late"
        if name in uploads and shown == Activity.UPLOADING:
            done, total = max(done, uploads[name].received), uploads[name].size
        out["clients"].append({
            "name": name, "state": shown, "detail": client.detail, "bytes_done": done, "bytes_total": total,
            "last_heartbeat_unix": client.last_seen or 0.0, "last_metrics": client.last_metrics,
            "sampled": name in assigned,
        })
    if run:
        out["rounds"] = _rounds(state, run.run_id)
    return out


def _rounds(state: State, run_id: str) -> list[dict[str, Any]]:
    evals: dict[int, list[dict[str, float]]] = {}
    for report in state.metrics(run_id, MetricsKind.EVAL):
        evals.setdefault(report.round, []).append(report.metrics)
    server = {report.round: report.metrics for report in state.metrics(run_id, MetricsKind.SERVER)}
    counts = state.update_counts(run_id)
    rows = []
    for g in state.globals(run_id):
        rnd = state.round(run_id, g.round)
        rows.append({"round": g.round, "phase": "done", "global_digest": g.digest,
                     "num_updates": counts.get(g.round, 0) if g.round else 0,
                     "eval_metrics": weighted_metrics(evals.get(g.round, [])),
                     "server_metrics": server.get(g.round, {}),
                     "started_unix": rnd.started_at if rnd else g.created_at, "finished_unix": g.created_at})
    return rows
