"""``hf:<id>@<revision>`` against a loopback hub (tests/fake_hub.py): the revision is pinned to its commit, the download
is logged, the snapshot is the base whose digest a site reports, a cached revision loads offline, and a hub that
cannot be reached fails at once with a hint instead of retrying."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from fedvlm.learner import Learner
from fedvlm.spec import TaskSpec
from fedvlm.vlm.loading import load_base, resolve_model
from fedvlm.vlm.presets import preset_dir

from .fake_hub import FakeHub


@pytest.fixture(scope="module")
def revisions(fedvlm_cache) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Two commits of one model: the tiny-llava preset, and the same weights with another vision_feature_layer."""
    files = {p.name: p.read_bytes() for p in preset_dir("tiny-llava").iterdir() if p.is_file()}
    changed = dict(files, **{"config.json": files["config.json"].replace(b'"vision_feature_layer": -1',
                                                                         b'"vision_feature_layer": -2')})
    assert changed != files
    return files, changed


@pytest.fixture
def hub(revisions, monkeypatch, tmp_path):
    first, second = revisions
    with FakeHub() as server:
        server.main = server.add_commit("org/tiny", first, refs=("main",))
        server.v2 = server.add_commit("org/tiny", second, refs=("v2",))
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        yield server


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_revision_is_pinned_to_its_commit_and_the_download_is_logged(hub, caplog):
    caplog.set_level(logging.INFO, logger="fedvlm.vlm.loading")
    source = resolve_model("hf:org/tiny@v2")
    assert source.name == "org/tiny" and source.revision == hub.v2
    assert source.directory.name == hub.v2 and (source.directory / "model.safetensors").is_file()
    model, _ = load_base(source)
    assert model.config.vision_feature_layer == -2  # v2's config, not main's
    assert "GET /api/models/org/tiny/revision/v2" in hub.requests
    assert not any(hub.main in request for request in hub.requests)  # nothing of main was fetched
    messages = [r.getMessage() for r in caplog.records]
    assert f"downloading org/tiny@v2 (commit {hub.v2}) into {source.directory.parents[2]}" in messages
    assert any(m.startswith("Download complete: ") and m.endswith("(100%)") for m in messages)
    assert resolve_model("hf:org/tiny").revision == hub.main  # no revision: the default branch


def test_a_hub_model_records_its_id_and_commit_and_digests_its_snapshot(hub, fedvlm_cache):
    learner = Learner(TaskSpec(model="hf:org/tiny@v2"), None)
    config = learner.adapter_config()
    assert config["base_model_name_or_path"] == "org/tiny" and config["revision"] == hub.v2
    preset = Learner(TaskSpec(), None)  # the same weights file as a preset directory
    assert len(learner.base_model_digest()) == 64
    assert learner.base_model_digest() == preset.base_model_digest()


def test_a_cached_revision_loads_without_the_hub_and_an_uncached_one_fails_with_a_hint(hub, monkeypatch):
    resolve_model("hf:org/tiny@v2")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert resolve_model("hf:org/tiny@v2").revision == hub.v2
    assert resolve_model(f"hf:org/tiny@{hub.v2}").revision == hub.v2
    with pytest.raises(OSError, match=rf"hf download org/tiny --revision {hub.main}"):
        resolve_model(f"hf:org/tiny@{hub.main}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("hf:org/tiny@v2").revision == hub.v2


def test_an_unreachable_hub_fails_at_once_with_a_hint(monkeypatch, tmp_path, caplog):
    """The ~50 s of huggingface_hub retries (5 per file, with backoff) never start: no 'Retrying' line."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError) as error:
        load_base("hf:org/not-cached")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("task.model: cannot load 'hf:org/not-cached': the hub did not serve org/not-cached "
                              "(ConnectError")
    assert "has no complete snapshot of it" in message and "`hf download org/not-cached`" in message
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


def test_a_hub_that_never_answers_is_given_up_after_the_probe_timeout(monkeypatch, tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        with pytest.raises(OSError, match=r"the hub did not serve org/silent \(ReadTimeout"):
            resolve_model("hf:org/silent")


def test_malformed_revisions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="nothing after '@'"):
        resolve_model("hf:org/tiny@")
    directory = Path(tmp_path)
    with pytest.raises(ValueError, match="a revision pins hub ids only"):
        resolve_model(f"hf:{directory}@main")
