"""What `fedvlm-coord status` shows: a snapshot of the state database, as plain data and as rich tables.

The snapshot's keys are the field names of fedvlm.v1.FederationStatus, so the same dict is served by the Admin
RPC (live coordinator) and read straight from state.db (coordinator stopped).
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from .store import Store


def weighted_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Example-weighted mean of per-site metric dicts (weight = their "num_examples", default 1)."""
    total = sum(r.get("num_examples", 1.0) for r in rows)
    if not rows or total <= 0:
        return {}
    keys = sorted({k for r in rows for k in r if k != "num_examples"})
    out = {k: sum(r.get(k, 0.0) * r.get("num_examples", 1.0) for r in rows) / total for k in keys}
    out["num_examples"] = total
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
    counts = {r["round"]: r["n"] for r in store.query(
        "SELECT round, COUNT(*) AS n FROM updates WHERE run_id=? GROUP BY round", (run_id,))}
    rows = []
    for g in store.query("SELECT round, digest, created_at FROM globals WHERE run_id=? ORDER BY round", (run_id,)):
        rnd = store.round(run_id, g["round"])
        rows.append({"round": g["round"], "phase": "done", "global_digest": g["digest"],
                     "num_updates": counts.get(g["round"], 0) if g["round"] else 0,
                     "eval_metrics": weighted_metrics(evals.get(g["round"], [])),
                     "started_unix": rnd.started_at if rnd else g["created_at"], "finished_unix": g["created_at"]})
    return rows


def render(status: dict[str, Any], console: Console) -> None:
    """Print the snapshot as a header line, a client table and a rounds table."""
    now = status.get("now_unix", time.time())
    if not status.get("run_id"):
        console.print(f"federation {status.get('federation_id', '')}: no run yet")
        return
    deadline = status.get("deadline_unix") or 0
    left = f", deadline in {deadline - now:.0f}s" if deadline and deadline > now else ""
    source = "live" if status.get("live") else "from state.db"
    console.print(
        f"[bold]run {status['run_id']}[/] ({status.get('run_state', '')}, {source}): round "
        f"{status.get('round', 0)} of {status.get('total_rounds', 0)}, phase {status.get('phase', '-')}{left}, "
        f"updates {status.get('accepted', 0)}/{status.get('sampled', 0)} (quorum {status.get('quorum', 0)})")
    console.print(Group(client_table(status), rounds_table(status)))


def client_table(status: dict[str, Any]) -> Table:
    now = status.get("now_unix", time.time())
    table = Table(title="clients")
    for col in ("client", "state", "transfer", "last heartbeat", "last metrics"):
        table.add_column(col)
    for c in status.get("clients", []):
        total = int(c.get("bytes_total", 0))
        transfer = f"{int(c.get('bytes_done', 0)) / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else ""
        beat = c.get("last_heartbeat_unix") or 0
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(c.get("last_metrics", {}).items()))
        state = c.get("state", "") + ("*" if c.get("sampled") else "")
        table.add_row(c["name"], state, transfer, f"{now - beat:.0f}s ago" if beat else "never", metrics)
    table.caption = "* sampled in the current round"
    return table


def rounds_table(status: dict[str, Any]) -> Table:
    table = Table(title="global versions")
    for col in ("round", "global", "updates", "accuracy", "eval examples"):
        table.add_column(col, justify="right")
    for r in status.get("rounds", []):
        m = r.get("eval_metrics", {})
        acc = f"{m['accuracy']:.3f}" if "accuracy" in m else "-"
        table.add_row(str(r.get("round", 0)), r.get("global_digest", "")[:12], str(r.get("num_updates", 0)), acc,
                      str(int(m.get("num_examples", 0))) if m else "-")
    return table
