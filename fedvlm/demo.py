"""`fedvlm demo`: a real local federation on loopback, driven exactly as an operator and three sites would.

It runs the public commands as separate processes: `fedvlm-coord init / enroll / serve` and three
`fedvlm-client` processes, each holding its own slice of the built-in digits data, over mutual TLS on
127.0.0.1. It watches the coordinator through the Admin RPC (admin certificate) and ends with the held-out
accuracy of every global version and an exported PEFT adapter.

The model is any built-in preset (``--model``); the tiny ones train with ``TINY_TRAIN``, the pretrained ones
(135 M parameters) with ``PRETRAINED_TRAIN``, sized so that the whole demo fits in 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedvlm.status_view import view
from fedvlm.wire.credentials import mtls_channel
from fedvlm.wire.plain import message_to_plain
from fedvlm.wire.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)
BIN = Path(sys.executable).parent
MARKER = ".fedvlm-demo"

DEMO_CONFIG = """\
# Written by `fedvlm demo`.
name = "fedvlm-demo"

[run]
rounds = {rounds}
min_clients = {sites}
clients_per_round = {sites}
quorum = {sites}
round_deadline = "10m"
poll_interval = 0.5
heartbeat_timeout = "60s"

[task]
model = "{model}"
strategy = "F-CL"
task_type = "classification"
seed = {seed}
{train}"""

# The tiny presets: the defaults (one local epoch per round, batch 8, lr 1e-3, all LM linear layers in LoRA).
TINY_TRAIN = ""
# The pretrained presets: LoRA on q/v only and a capped number of steps per round (a step of batch 8 takes seconds,
# not milliseconds), two new tokens are enough for a digit and the end of the turn; a smaller held-out set.
PRETRAINED_TRAIN = """\
[task.lora]
targets = ["q_proj", "v_proj"]
[task.train]
batch_size = 8
lr = 0.003
max_steps = 16
eval_batch_size = 16
max_new_tokens = 2
"""
PRETRAINED_TEST_FRACTION = 0.1  # 180 held-out digits (60 per site) instead of 397


class DemoError(Exception):
    """The demo could not complete; the message says which process failed and where its log is."""


@dataclass
class DemoResult:
    rounds: list[dict]
    adapter_dir: Path
    seconds: float


def run_demo(workdir: Path, sites: int = 3, rounds: int = 5, seed: int = 0, console: Console | None = None,
             timeout: float = 1200.0, model: str = "tiny-llava") -> DemoResult:
    """Build data and the model preset, start a coordinator and `sites` clients, show progress, return per-round
    accuracy. ``DemoError`` for an unknown preset or a missing pretrained weight package (nothing is started)."""
    from fedvlm.data.digits import build_digits
    from fedvlm.vlm.presets import PRESETS, PRETRAINED_PRESETS, preset_dir
    from fedvlm.vlm.pretrained import PretrainedWeightsError

    if model not in PRESETS:
        raise DemoError(f"unknown model preset {model!r} (available: {', '.join(PRESETS)})")
    console = console or Console()
    started = time.time()
    _fresh_workdir(workdir)
    pretrained = model in PRETRAINED_PRESETS
    try:
        # Built here once, into the cache the clients read, instead of three clients racing to build it.
        with console.status(f"building model preset {model} (first time only)"):
            preset_dir(model)
    except PretrainedWeightsError as exc:
        raise DemoError(str(exc)) from exc
    layout = build_digits(workdir / "data", sites=sites, seed=seed,
                          **({"test_fraction": PRETRAINED_TEST_FRACTION} if pretrained else {}))
    console.print(f"data: {sites} sites of scikit-learn digits under {workdir / 'data'}")
    fed = workdir / "coordinator"
    _check([str(BIN / "fedvlm-coord"), "init", "--dir", str(fed), "--host", "localhost,127.0.0.1",
            "--name", "fedvlm-demo"], workdir / "init.log")
    train = PRETRAINED_TRAIN if pretrained else TINY_TRAIN
    (fed / "federation.toml").write_text(DEMO_CONFIG.format(rounds=rounds, sites=sites, seed=seed, model=model,
                                                            train=train))
    logs = workdir / "logs"
    logs.mkdir()
    procs: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        coord = _spawn("coordinator", [str(BIN / "fedvlm-coord"), "serve", "--dir", str(fed), "--listen",
                                       "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0", "--exit-when-done"], logs)
        procs.append(coord)
        address, enroll_port = _wait_bound(fed, coord)
        console.print(f"coordinator: federation port {address} (mTLS), enrollment port {enroll_port}")
        for i, site_dir in enumerate(layout.site_dirs):
            name = f"site-{i + 1}"
            token = _check([str(BIN / "fedvlm-coord"), "enroll", name, "--dir", str(fed), "--ttl", "1h",
                            "--enroll-port", str(enroll_port)], logs / f"enroll-{name}.log").strip().splitlines()[-1]
            procs.append(_spawn(name, [str(BIN / "fedvlm-client"), "--coordinator", address, "--join-token", token,
                                       "--data", str(site_dir), "--state", str(workdir / "sites" / name),
                                       "--device", "cpu", "--threads", "1"], logs))
        _watch(fed, address, procs, console, timeout)
        for name, proc, path in procs:
            if proc.wait(timeout=120) != 0:
                raise DemoError(f"{name} exited with {proc.returncode}; see {path}")
    finally:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    rounds_json = _check([str(BIN / "fedvlm-coord"), "rounds", "--dir", str(fed), "--json"], logs / "rounds.log")
    out = workdir / "adapter"
    _check([str(BIN / "fedvlm-coord"), "export", "--dir", str(fed), "--out", str(out)], logs / "export.log")
    return DemoResult(json.loads(rounds_json), out, time.time() - started)


def accuracy_table(rounds: list[dict]) -> Table:
    """Held-out accuracy (example-weighted over the sites' test splits) of every global version."""
    table = Table(title="global model, held-out accuracy (exact match of the generated digit)")
    for col in ("round", "global", "accuracy", "test examples"):
        table.add_column(col, justify="right")
    for r in rounds:
        m = r.get("eval_metrics", {})
        table.add_row(str(r.get("round", 0)), r.get("global_digest", "")[:12],
                      f"{m['accuracy']:.3f}" if "accuracy" in m else "-", str(int(m.get("num_examples", 0))))
    return table


def _fresh_workdir(workdir: Path) -> None:
    if workdir.exists():
        if not (workdir / MARKER).exists():
            raise DemoError(f"{workdir} exists and was not made by `fedvlm demo`; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by fedvlm demo; removed by the next demo run\n")


def _check(cmd: list[str], log_path: Path) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(cmd[:2])}` failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return result.stdout


def _spawn(name: str, cmd: list[str], logs: Path) -> tuple[str, subprocess.Popen, Path]:
    path = logs / f"{name}.log"
    with open(path, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    return name, proc, path


def _wait_bound(fed: Path, coord: tuple[str, subprocess.Popen, Path]) -> tuple[str, int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if coord[1].poll() is not None:
            raise DemoError(f"coordinator exited with {coord[1].returncode}; see {coord[2]}")
        path = fed / "serve.json"
        if path.exists():
            info = json.loads(path.read_text())
            return info["federation"], int(info["enrollment"].rsplit(":", 1)[1])
        time.sleep(0.2)
    raise DemoError(f"coordinator did not start; see {coord[2]}")


def _watch(fed: Path, address: str, procs, console: Console, timeout: float) -> None:
    """Live status display until the run is done; fails fast if any process dies."""
    pki = fed / "pki"
    channel = mtls_channel(address, (pki / "admin.key").read_bytes(), (pki / "admin.pem").read_bytes(),
                           (pki / "ca.pem").read_bytes())
    stub = admin_pb2_grpc.AdminStub(channel)
    deadline = time.monotonic() + timeout
    status: dict = {}
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        while time.monotonic() < deadline:
            for name, proc, path in procs:
                if proc.poll() not in (None, 0):
                    raise DemoError(f"{name} exited with {proc.returncode}; see {path}")
            try:
                reply = stub.GetStatus(admin_pb2.StatusRequest(), timeout=5)
            except grpc.RpcError:
                if procs[0][1].poll() == 0 and status.get("run_state") in ("evaluating", "done"):
                    break  # the coordinator finished and exited between two polls
                time.sleep(0.5)
                continue
            status = message_to_plain(reply)
            live.update(view(status))
            if status.get("run_state") == "done":
                break
            time.sleep(0.5)
        else:
            raise DemoError(f"the run did not finish within {timeout:.0f}s")
    channel.close()
