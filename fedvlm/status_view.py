"""Rendering of a federation status (the fields of fedvlm.v1.FederationStatus as a dict) with rich.

Shared by `fedvlm-coord status` and the `fedvlm demo` progress display.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from fedvlm.tasks import primary_metric


def headline(status: dict[str, Any]) -> str:
    """One line: run, state, round k of N, phase, time to the deadline, updates against quorum."""
    now = status.get("now_unix", time.time())
    if not status.get("run_id"):
        return f"federation {status.get('federation_id', '')}: no run yet"
    deadline = status.get("deadline_unix") or 0
    open_ = status.get("run_state") in ("running", "evaluating")
    left = f", deadline in {deadline - now:.0f}s" if open_ and deadline > now else ""
    source = "live" if status.get("live") else "from state.db"
    return (f"[bold]run {status['run_id']}[/] ({status.get('run_state', '')}, {source}): round "
            f"{status.get('round', 0)} of {status.get('total_rounds', 0)}, phase {status.get('phase') or '-'}{left}, "
            f"updates {status.get('accepted', 0)}/{status.get('sampled', 0)} (quorum {status.get('quorum', 0)})")


def view(status: dict[str, Any]) -> Group:
    """The headline, the client table and the global-versions table, ready for console.print or Live."""
    return Group(headline(status), client_table(status), rounds_table(status))


def render(status: dict[str, Any], console: Console) -> None:
    """Print the whole status."""
    console.print(view(status))


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
    dp = any("dp_epsilon" in r.get("server_metrics", {}) for r in status.get("rounds", []))
    for col in ("round", "global", "updates", "eval metric", "eval examples") + (("DP epsilon",) if dp else ()):
        table.add_column(col, justify="right")
    for r in status.get("rounds", []):
        m = r.get("eval_metrics", {})
        headline_metric = primary_metric(m)  # accuracy, else CIDEr, else mIoU (fedvlm.tasks)
        acc = f"{headline_metric[0]}={headline_metric[1]:.3f}" if headline_metric else "-"
        server = r.get("server_metrics", {})
        extra = (f"{server['dp_epsilon']:.3g} at {server.get('dp_delta', 0):.0e}" if "dp_epsilon" in server
                 else "-",) if dp else ()
        table.add_row(str(r.get("round", 0)), r.get("global_digest", "")[:12], str(r.get("num_updates", 0)), acc,
                      str(int(m.get("num_examples", 0))) if m else "-", *extra)
    return table
