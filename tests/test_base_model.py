"""The run's base model: the initial adapter records its base weights' digest, every global carries it, and a site
whose base weights differ stops with one line before it trains (in process, and through real processes)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedvlm import adapters
from fedvlm.coordinator.config import RunConfig
from fedvlm.learner import BaseModelMismatch, Learner
from fedvlm.spec import TaskSpec
from fedvlm.vlm.presets import preset_dir

from .harness import Coordinator, shut_down, small_sites, start_site, wait_for
from .inprocess import InProcessCoordinator, tensors


def _tamper(model_dir) -> None:
    """Change one weight of a built preset in place (another site's different base)."""
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    name = next(k for k in sorted(weights) if "language_model" in k and weights[k].dtype == torch.float32)
    weights[name] = weights[name] + 0.01
    save_file(weights, path, metadata={"format": "pt"})


def test_a_site_with_other_base_weights_is_refused_in_one_line(tmp_path):
    a = Learner(TaskSpec(), None, cache_dir=tmp_path / "a")
    _tamper(preset_dir("tiny-llava", tmp_path / "b"))
    b = Learner(TaskSpec(), None, cache_dir=tmp_path / "b")
    recorded = a.base_model_info()
    assert json.loads(recorded) == {"model": "tiny-llava", "sha256": a.base_model_digest()}
    Learner(TaskSpec(), None, cache_dir=tmp_path / "a").check_base_model(recorded)  # the same base passes
    a.check_base_model(None)  # a run from before globals carried the record
    with pytest.raises(BaseModelMismatch) as err:
        b.check_base_model(recorded)
    message = str(err.value)
    assert "\n" not in message and "differs from the run's" in message and a.base_model_digest()[:12] in message


def test_every_global_carries_the_initial_adapters_base_model_record(tmp_path):
    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=2, min_clients=2, clients_per_round=2, quorum=2),
                                 names=("a", "b"))
    run = coord.driver.ensure_run()
    coord.heartbeat("a")
    coord.state.claim_init(run.run_id, "a")
    record = json.dumps({"model": "tiny-llava", "sha256": "ab" * 32})
    data = adapters.to_bytes(tensors(0.0), {adapters.BASE_MODEL_METADATA: record})
    ticket = coord.start("a", coord.manifest("a", data, round_=0))
    coord.intake.receive("a", iter([(ticket.upload_id, 0, data)]))
    coord.driver.tick()
    coord.heartbeat()
    coord.driver.tick()
    for name, value in (("a", 1.0), ("b", 2.0)):
        coord.send(name, tensors(value))
    coord.driver.tick()
    for number in (0, 1):
        digest = coord.state.global_version(run.run_id, number).digest
        assert adapters.metadata_of(coord.blobs.read(digest))[adapters.BASE_MODEL_METADATA] == record


CONFIG = """
name = "it-base"
[run]
rounds = 1
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.3
heartbeat_timeout = "60s"
[task]
model = "tiny-llava"
[task.train]
batch_size = 4
max_steps = 2
"""


@pytest.mark.slow
def test_a_site_whose_base_differs_stops_before_it_trains(digits, tmp_path):
    coord = Coordinator(tmp_path / "coord", CONFIG)
    coord.start()
    sites = small_sites(digits, tmp_path, 2, 8, 2)
    _tamper(preset_dir("tiny-llava", tmp_path / "cache-2"))
    procs = []
    try:
        procs.append(start_site(coord, "site-1", sites[0], tmp_path, tmp_path / "cache-1"))
        wait_for(lambda: coord.query("SELECT 1 FROM globals WHERE round=0"), 180, "the initial global")
        procs.append(start_site(coord, "site-2", sites[1], tmp_path, tmp_path / "cache-2"))
        wait_for(lambda: procs[1].poll() is not None, 180, "site-2 to stop")
        assert procs[1].returncode != 0
        log = (tmp_path / "site-2.log").read_text()
        assert "differs from the run's" in log and "Traceback" not in log
        assert not coord.query("SELECT 1 FROM updates WHERE client='site-2'")
    finally:
        shut_down(coord, procs)
