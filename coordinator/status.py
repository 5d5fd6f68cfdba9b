"""What `fedvlm-coord status` shows: a snapshot of the state database as plain data.

The snapshot's keys are the field names of fedvlm.v1.FederationStatus, so the same dict is served by the Admin
RPC (live coordinator) and read straight from state.db (coordinator stopped); fedvlm.status_view renders it.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .store import Store


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


def snapshot(store: Store, live: bool) -> dict[str, Any]:
    """The federation's state now: run, round, phase, deadline, quorum, every client, every global version."""
    now = time.time()
    out: dict[str, Any] = {"federation_id": store.get_meta("federation_id") or "", "now_unix": now, "live": live,
                           "clients": [], "rounds": []}
    run = store.current_run()
    config = json.loads(run.config_json) if run else {}
    timeout = config.get("heartbeat_timeout", 60.0)
    rnd = store.round(run.run_id, run.round) if run else None
    assigned = store.assignments(run.run_id, run.round) if run else {}
    if run:
        out.update(run_id=run.run_id, run_state=run.state, round=run.round, total_rounds=config.get("rounds", 0),
                   quorum=config.get("quorum", 0), sampled=len(assigned),
                   accepted=sum(1 for s in assigned.values() if s == "accepted"))
        if rnd:
            out.update(phase="final evaluation" if rnd.phase == "evaluating" else rnd.phase,
                       deadline_unix=rnd.deadline or 0.0)
    uploads = {r["client"]: r for r in store.query("SELECT * FROM uploads WHERE run_id=? AND round=?",
                                                   (run.run_id, run.round))} if run else {}
    for row in store.query("SELECT * FROM clients ORDER BY name"):
        name = row["name"]
        state, done, total = row["state"], row["bytes_done"], row["bytes_total"]
        if row["revoked"]:
            state = "revoked"
        elif row["last_seen"] is None or now - row["last_seen"] > timeout:
            state = "offline"
        elif assigned.get(name) == "late":
            state = "late"
        if name in uploads and state == "uploading":
            done, total = max(done, uploads[name]["received"]), uploads[name]["size"]
        out["clients"].append({
            "name": name, "state": state, "detail": row["detail"], "bytes_done": done, "bytes_total": total,
            "last_heartbeat_unix": row["last_seen"] or 0.0, "last_metrics": json.loads(row["last_metrics"]),
            "sampled": name in assigned,
        })
    if run:
        out["rounds"] = _rounds(store, run.run_id)
    return out


def _rounds(store: Store, run_id: str) -> list[dict[str, Any]]:
    evals: dict[int, list[dict[str, float]]] = {}
    for row in store.query("SELECT round, metrics_json FROM metrics WHERE run_id=? AND kind='eval'", (run_id,)):
        evals.setdefault(row["round"], []).append(json.loads(row["metrics_json"]))
    server = {r["round"]: json.loads(r["metrics_json"]) for r in store.query(
        "SELECT round, metrics_json FROM metrics WHERE run_id=? AND kind='server'", (run_id,))}
    counts = {r["round"]: r["n"] for r in store.query(
        "SELECT round, COUNT(*) AS n FROM updates WHERE run_id=? GROUP BY round", (run_id,))}
    rows = []
    for g in store.query("SELECT round, digest, created_at FROM globals WHERE run_id=? ORDER BY round", (run_id,)):
        rnd = store.round(run_id, g["round"])
        rows.append({"round": g["round"], "phase": "done", "global_digest": g["digest"],
                     "num_updates": counts.get(g["round"], 0) if g["round"] else 0,
                     "eval_metrics": weighted_metrics(evals.get(g["round"], [])),
                     "server_metrics": server.get(g["round"], {}),
                     "started_unix": rnd.started_at if rnd else g["created_at"], "finished_unix": g["created_at"]})
    return rows
