"""Rendering of a federation status (the fields of fedvlm.v1.FederationStatus as a dict) with rich.

Shared by `fedvlm-coord status` and the `fedvlm demo` progress display.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedvlm.tasks import primary_metric


def headline(status: dict[str, Any]) -> str:
    """One line: run, state, round k of N, phase, time to the deadline, updates against quorum (as markup)."""
    return escape(_headline(status)).replace(_RUN_MARK, "[bold]").replace(_END_MARK, "[/]")


_RUN_MARK, _END_MARK = "\x00run\x00", "\x00end\x00"


def _headline(status: dict[str, Any]) -> str:
    now = status.get("now_unix", time.time())
    if not status.get("run_id"):
        return f"federation {status.get('federation_id', '')}: no run yet"
    source = "live" if status.get("live") else "from state.db"
    name = f"{_RUN_MARK}run {status.get('run_number') or ''} ({status['run_id']}){_END_MARK}"
    state, phase = status.get("run_state", ""), status.get("phase") or "-"
    rounds = f"round {status.get('round', 0)} of {status.get('total_rounds', 0)}"
    deadline = status.get("deadline_unix") or 0
    left = f", deadline in {deadline - now:.0f}s" if deadline > now else ""
    if state == "init":
        total = status.get("total_rounds", 0)
        return f"{name} (init, {source}): waiting for the initial adapter, then {total} rounds"
    if state == "done":
        return f"{name} (done, {source}): finished after {rounds}"
    if state == "stopped":
        return f"{name} (stopped, {source}): stopped in {rounds}: {status.get('stop_reason', '')}"
    if phase == "final evaluation":
        return (f"{name} ({state}, {source}): final evaluation of the round-{status.get('round', 0)} global{left}, "
                f"reports {status.get('accepted', 0)}/{status.get('sampled', 0)}")
    secure = status.get("secure_aggregation") or {}
    if secure.get("phase"):  # the secure-aggregation sub-phase of the training round
        phase += (f" / secure aggregation {secure['phase']} {secure.get('done', 0)}/{secure.get('expected', 0)}"
                  f" (threshold {secure.get('threshold', 0)}, attempt {secure.get('attempt', 0)})")
    return (f"{name} ({state}, {source}): {rounds}, phase {phase}{left}, updates {status.get('accepted', 0)}/"
            f"{status.get('sampled', 0)} (quorum {status.get('quorum', 0)})")


def view(status: dict[str, Any]) -> Group:
    """The headline, any config notice, the client table and the global-versions table, for console.print or Live."""
    notice = status.get("config_notice")
    parts = [headline(status), *([Text(notice, style="yellow")] if notice else []), client_table(status),
             rounds_table(status)]
    return Group(*parts)


def render(status: dict[str, Any], console: Console) -> None:
    """Print the whole status."""
    console.print(view(status))


def progress(client: dict[str, Any]) -> str:
    """What a site is in the middle of: "step k/n" while training, "a/b MiB" while transferring, else ""."""
    if client.get("steps_total"):
        return f"step {client.get('step', 0)}/{client['steps_total']}"
    total = int(client.get("bytes_total", 0))
    return f"{int(client.get('bytes_done', 0)) / 2**20:.1f}/{total / 2**20:.1f} MiB" if total else ""


def training(client: dict[str, Any]) -> str:
    """The site's latest local round: "12.3s, 40 steps (round 2)", or "" before its first."""
    if not client.get("train_round"):
        return ""
    seconds, steps = client.get("train_seconds", 0), client.get("train_steps", 0)
    return f"{seconds:.1f}s, {steps} steps (round {client['train_round']})"


def client_table(status: dict[str, Any]) -> Table:
    """One row per site: state, step k/n or bytes in flight, its latest training, heartbeat, metrics, and the
    reason of a site that stopped on an error. Site-chosen strings are shown as text, never read as markup."""
    now = status.get("now_unix", time.time())
    table = Table(title="clients")
    for col in ("client", "state", "progress", "last training", "last heartbeat", "last metrics", "note"):
        table.add_column(col)
    for c in status.get("clients", []):
        beat = c.get("last_heartbeat_unix") or 0
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in sorted(c.get("last_metrics", {}).items()))
        state = c.get("state", "") + ("*" if c.get("sampled") else "")
        note = c.get("detail", "") if c.get("state") == "failed" else ""
        beat_ago = f"{now - beat:.0f}s ago" if beat else "never"
        table.add_row(Text(c["name"]), state, progress(c), training(c), beat_ago, Text(metrics),
                      Text(note, style="red"))
    table.caption = "* sampled in the current round"
    return table


def runs_table(status: dict[str, Any]) -> Table:
    """One row per run of the federation (`fedvlm-coord run list`)."""
    table = Table(title="runs")
    for col in ("run", "id", "state", "rounds", "model", "strategy", "algorithm", "created", "config", "note"):
        table.add_column(col)
    for r in status.get("runs", []):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.get("created_unix", 0)))
        table.add_row(str(r.get("number", "")), r.get("run_id", ""), r.get("state", ""),
                      f"{r.get('rounds_done', 0)}/{r.get('total_rounds', 0)}", Text(r.get("model", "")),
                      r.get("strategy", ""), r.get("algorithm", ""), created, Text(r.get("config_source", "")),
                      Text(r.get("stop_reason", "")))
    return table


def summary_line(status: dict[str, Any]) -> str:
    """The status in one plain line (for `status --watch` to a pipe): the headline and each site's state."""
    sites = "; ".join(f"{c['name']} {c.get('state', '')}" + (f" {progress(c)}" if progress(c) else "")
                      for c in status.get("clients", []))
    line = _headline(status).replace(_RUN_MARK, "").replace(_END_MARK, "")
    stamp = time.strftime("%H:%M:%S", time.localtime(status.get("now_unix", time.time())))
    return f"{stamp} {line}" + (f" | {sites}" if sites else "")


def change_key(status: dict[str, Any]) -> str:
    """What `--watch` compares to decide that the status changed: everything but the clock and the heartbeats."""
    def strip(client: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in client.items() if k != "last_heartbeat_unix"}

    rest = {k: v for k, v in status.items() if k not in ("now_unix", "clients")}
    return json.dumps({**rest, "clients": [strip(c) for c in status.get("clients", [])]}, sort_keys=True)


def _size(nbytes: int) -> str:
    """A global's size; "-" where the document has none (a coordinator older than `global_bytes`)."""
    if not nbytes:
        return "-"
    return f"{nbytes / 2**10:.1f} KiB" if nbytes < 2**20 else f"{nbytes / 2**20:.1f} MiB"


def rounds_table(status: dict[str, Any]) -> Table:
    """One row per global version of the run: its size, updates, the headline eval metric, examples, DP epsilon if
    any."""
    table = Table(title="global versions")
    dp = any("dp_epsilon" in r.get("server_metrics", {}) for r in status.get("rounds", []))
    for col in ("round", "global", "global size", "updates", "eval metric", "eval examples") + \
            (("DP epsilon",) if dp else ()):
        table.add_column(col, justify="right")
    for r in status.get("rounds", []):
        m = r.get("eval_metrics", {})
        headline_metric = primary_metric(m)  # accuracy, else CIDEr, else mIoU (fedvlm.tasks)
        acc = f"{headline_metric[0]}={headline_metric[1]:.3f}" if headline_metric else "-"
        server = r.get("server_metrics", {})
        extra = (f"{server['dp_epsilon']:.3g} at {server.get('dp_delta', 0):.0e}" if "dp_epsilon" in server
                 else "-",) if dp else ()
        table.add_row(str(r.get("round", 0)), r.get("global_digest", "")[:12], _size(r.get("global_bytes", 0)),
                      str(r.get("num_updates", 0)), acc,
                      str(int(m.get("num_examples", 0))) if m else "-", *extra)
    return table
