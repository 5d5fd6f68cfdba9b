"""A real federation: a coordinator daemon and three fedvlm-client processes over mTLS on loopback.

One run carries several checks because each costs real processes and real training: status while a round
runs, a coordinator SIGKILLed mid-round that resumes without asking sites again, completion of every round,
an exported adapter that PEFT loads and that reproduces the global's outputs, and the audit chain.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from fedvlm import adapters
from fedvlm.data.digits import build_digits
from fedvlm.vlm.presets import preset_dir

from .harness import Coordinator, coord_cli, start_sites, wait_for

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
                          extra=lambda i: ("--max-upload-rate", "0.04") if f"site-{i + 1}" == SLOW_SITE else ())
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
        for proc in clients.values():
            if proc.poll() is None:
                proc.kill()
        coord.kill(signal.SIGTERM)


class Observations:
    """Client states seen in the state database while the run was going."""

    def __init__(self) -> None:
        self.states: set[tuple[str, str]] = set()
        self.upload_progress: list[tuple[int, int]] = []

    def sample(self, coord: Coordinator) -> None:
        for row in coord.query("SELECT name, state, bytes_done, bytes_total FROM clients"):
            self.states.add((row["name"], row["state"]))
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
    assert {"training", "uploading"} <= states, states
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


def test_exported_adapter_loads_with_peft_and_reproduces_the_global(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from fedvlm.learner import Learner
    from fedvlm.spec import TaskSpec

    coord = run["coord"]
    out = tmp_path / "adapter"
    coord_cli("export", "--dir", str(coord.fed.root), "--round", "3", "--out", str(out))
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    task = TaskSpec.from_json(coord.query("SELECT task_json FROM runs")[0]["task_json"])
    digest = coord.query("SELECT digest FROM globals WHERE round=3")[0]["digest"]
    global_tensors = adapters.from_bytes(coord.fed.blobs.joinpath(digest[:2], digest).read_bytes())
    learner = Learner(task, run["layout"].site_dirs[0], cache_dir=run["cache"])
    learner.load_adapter_state(global_tensors)
    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"])
    exported = PeftModel.from_pretrained(base, out).eval()
    learner.model.eval()
    batch = learner.batches.training(learner._examples["test"][:4])
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, learner.model(**batch).logits)


def test_audit_chain_verifies_after_the_run(run):
    out = coord_cli("audit", "verify", "--dir", str(run["coord"].fed.root))
    assert "4 signed global versions verified" in out
