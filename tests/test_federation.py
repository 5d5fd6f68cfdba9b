"""A real federation: a coordinator daemon and three fedvlm-client processes over mTLS on loopback.

One run carries several checks because each costs real processes and real training: status while a round
runs, a coordinator SIGKILLed mid-round that resumes without asking sites again, completion of every round,
an exported adapter that PEFT loads and that reproduces the global's outputs, and the audit chain.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedvlm.data.digits import build_digits
from fedvlm.vlm.presets import preset_dir

from .harness import BIN, Coordinator, coord_cli, env_for_subprocess, shut_down, start_sites, wait_for

ROOT = Path(__file__).resolve().parents[1]

# Real processes (a coordinator daemon, sites): the slow half of `make test`.
pytestmark = pytest.mark.slow

CONFIG = """
name = "it-fed"
[run]
rounds = 3
min_clients = 3
clients_per_round = 3
quorum = 3
round_deadline = "300s"
poll_interval = 0.3
heartbeat_timeout = "60s"
[task]
model = "tiny-llava"
strategy = "F-CL"
seed = 0
[task.train]
local_epochs = 0.5
batch_size = 8
lr = 0.001
"""
SLOW_SITE = "site-3"  # uploads at ~40 kB/s so that a round has a window with some updates accepted


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    cache = root / "cache"
    preset_dir("tiny-llava", cache)  # build once here instead of racing three clients
    layout = build_digits(root / "data", sites=3, seed=0)
    coord = Coordinator(root / "coord", CONFIG)
    coord.start()
    clients = start_sites(coord, layout.site_dirs, root, cache,
                          extra=lambda i: ("--progress-every", "0",
                                           *(("--max-upload-rate", "0.04") if f"site-{i + 1}" == SLOW_SITE else ())))
    observed = Observations()
    try:
        # Round 2 with some updates accepted and the slow site still uploading: kill the coordinator.
        def mid_round_two():
            observed.sample(coord)
            rows = coord.query("SELECT client, digest, accepted_at FROM updates WHERE round=2")
            return rows if 1 <= len(rows) < 3 else None

        before_kill = wait_for(mid_round_two, 240, "round 2 to have some but not all updates", interval=0.05)
        status_mid_round = json.loads(coord_cli("status", "--dir", str(coord.fed.root), "--json"))
        coord.kill(signal.SIGKILL)
        time.sleep(1.5)  # the sites notice and back off
        coord.start()

        def finished():
            observed.sample(coord)
            return all(p.poll() is not None for p in clients.values())

        wait_for(finished, 300, "all sites to finish the run", interval=0.1)
        yield {"coord": coord, "clients": clients, "root": root, "cache": cache, "layout": layout,
               "before_kill": before_kill, "status_mid_round": status_mid_round, "observed": observed}
    finally:
        shut_down(coord, clients.values(), signal.SIGTERM)


class Observations:
    """Client states seen in the state database while the run was going."""

    def __init__(self) -> None:
        self.states: set[tuple[str, str]] = set()
        self.upload_progress: list[tuple[int, int]] = []
        self.steps: set[tuple[int, int]] = set()

    def sample(self, coord: Coordinator) -> None:
        for row in coord.query("SELECT name, state, bytes_done, bytes_total, step, steps_total FROM clients"):
            self.states.add((row["name"], row["state"]))
            if row["state"] == "training" and row["steps_total"]:
                self.steps.add((row["step"], row["steps_total"]))
            if row["state"] == "uploading" and row["bytes_done"]:
                self.upload_progress.append((row["bytes_done"], row["bytes_total"]))


def test_every_site_finishes_and_every_round_has_a_global(run):
    coord = run["coord"]
    for name, proc in run["clients"].items():
        assert proc.returncode == 0, (run["root"] / f"{name}.log").read_text()[-3000:]
    assert [r["round"] for r in coord.query("SELECT round FROM globals ORDER BY round")] == [0, 1, 2, 3]
    assert coord.query("SELECT state FROM runs") == [{"state": "done"}]
    for rnd in (1, 2, 3):
        assert coord.query("SELECT COUNT(*) AS n FROM updates WHERE round=?", (rnd,)) == [{"n": 3}]


def test_status_showed_round_phases_and_upload_progress(run):
    states = {state for _, state in run["observed"].states}
    assert {"initializing", "training", "uploading"} <= states, states
    assert any(0 < step <= total for step, total in run["observed"].steps), run["observed"].steps
    for name in run["clients"]:  # progress lines during each local round, not only its summary at the end
        log = (run["root"] / f"{name}.log").read_text()
        assert re.search(r"round 1: step \d+/\d+ \(\d+%\)", log), log[-2000:]
    assert any(0 < done < total for done, total in run["observed"].upload_progress)
    mid = run["status_mid_round"]
    assert mid["round"] == 2 and mid["total_rounds"] == 3 and mid["phase"] == "training"
    assert mid["quorum"] == 3 and mid["sampled"] == 3 and 1 <= mid["accepted"] < 3
    assert {c["name"] for c in mid["clients"]} == {"site-1", "site-2", "site-3"}
    assert all(c["last_heartbeat_unix"] > 0 for c in mid["clients"])
    after = json.loads(coord_cli("status", "--dir", str(run["coord"].fed.root), "--json"))
    assert after["run_state"] == "done" and after["live"] is False
    scored = [r for r in after["rounds"] if r["eval_metrics"]]
    assert [r["round"] for r in scored] == [0, 1, 2, 3]  # every global, including the final one, was evaluated
    assert all(r["eval_metrics"]["num_examples"] == 395 for r in scored)


def test_coordinator_killed_mid_round_kept_accepted_updates_and_did_not_ask_again(run):
    coord = run["coord"]
    for row in run["before_kill"]:
        after = coord.query("SELECT digest, accepted_at FROM updates WHERE round=2 AND client=?", (row["client"],))
        assert after == [{"digest": row["digest"], "accepted_at": row["accepted_at"]}]
        log = (run["root"] / f"{row['client']}.log").read_text()
        assert log.count("round 2: trained") == 1, "a site whose update was accepted was asked to train again"
    assert "coordinator unreachable" in (run["root"] / f"{SLOW_SITE}.log").read_text()


def exported_with_base(run, tmp_path):
    """`export` of global 3 to tmp/adapter and the base `export` says to rebuild, built with that command."""
    coord = run["coord"]
    out = coord_cli("export", "--dir", str(coord.fed.root), "--round", "3", "--out", str(tmp_path / "adapter"))
    rebuild = out.split("rebuild it with: ", 1)[1].strip()
    assert rebuild == "fedvlm models build tiny-llava --out base/"
    result = subprocess.run(shlex.split(rebuild), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=env_for_subprocess(FEDVLM_CACHE=str(tmp_path / "fresh-cache"),  # built anew
                                                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"))
    assert result.returncode == 0, result.stderr
    return tmp_path / "adapter", tmp_path / "base"


def global_learner(run, number: int):
    from fedvlm.learner import Learner
    from fedvlm.spec import TaskSpec

    coord = run["coord"]
    task = TaskSpec.from_json(coord.query("SELECT task_json FROM runs")[0]["task_json"])
    digest = coord.query("SELECT digest FROM globals WHERE round=?", (number,))[0]["digest"]
    learner = Learner(task, run["layout"].site_dirs[0], cache_dir=run["cache"])
    learner.load_adapter_state(coord.blob(digest))
    return learner


def test_exported_adapter_loads_with_peft_on_the_rebuilt_base_and_reproduces_the_global(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out, base_dir = exported_with_base(run, tmp_path)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llava" and config["revision"] is None
    assert json.loads((out / "fedvlm_global.json").read_text())["base_model"]["rebuild"].startswith("fedvlm models")
    learner = global_learner(run, 3)
    exported = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), out).eval()
    learner.model.eval()
    batch = learner.batches.training(learner._examples["test"][:4])
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, learner.model(**batch).logits)


def test_the_readme_snippet_runs_as_written_and_answers_as_fedvlm_does(run, tmp_path):
    from fedvlm.train import generate_answers

    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("<!-- snippet: load-adapter -->\n```python\n", 1)[1].split("```", 1)[0]
    exported_with_base(run, tmp_path)
    learner = global_learner(run, 3)
    example = learner._examples["test"][0]
    assert example.exchanges[0][0] == "What digit is shown?"  # the question the snippet asks
    shutil.copy(example.images[0], tmp_path / "example.png")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env_for_subprocess())
    assert result.returncode == 0, result.stderr[-3000:]
    expected = generate_answers(learner.model, learner.batches, [example], 1, 4)[0]
    assert result.stdout.rstrip("\n") == expected


def test_audit_chain_verifies_after_the_run(run):
    out = coord_cli("audit", "verify", "--dir", str(run["coord"].fed.root))
    assert "4 signed global versions verified" in out
