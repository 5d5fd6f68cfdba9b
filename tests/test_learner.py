"""Learner: identical init across sites, training, adapter round-trips, PEFT export, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedvlm.learner import Learner
from fedvlm.spec import TaskSpec, TrainSpec
from fedvlm.train import batch_schedule


def spec(**train) -> TaskSpec:
    return TaskSpec(train=TrainSpec(**train))


@pytest.fixture(scope="module")
def trained(fedvlm_cache, digits) -> Learner:
    """A site learner after one short round (so LoRA B and the connector are non-trivial)."""
    learner = Learner(spec(max_steps=25), digits / "site_0")
    steps = []
    learner.result = learner.train_round(0, progress=lambda step, total: steps.append((step, total)))
    learner.progress_calls = steps
    return learner


def test_init_is_identical_across_sites_and_depends_on_seed(fedvlm_cache, digits):
    site_a, site_b = Learner(spec(), digits / "site_0"), Learner(spec(), digits / "site_1")
    assert len(site_a.base_model_digest()) == 64
    assert site_a.base_model_digest() == site_b.base_model_digest()
    a, b = site_a.adapter_state(), site_b.adapter_state()
    c = Learner(TaskSpec(seed=1), None).adapter_state()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k)
    for tensor in a.values():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()


def test_a_short_round_reduces_the_loss_and_reports_progress(trained):
    result = trained.result
    assert result.steps == 25 and result.num_examples == trained.num_train_examples == 468
    assert result.loss_last < result.loss_first
    assert result.seconds > 0
    assert trained.progress_calls == [(i, 25) for i in range(1, 26)]


def test_training_is_reproducible_per_round(fedvlm_cache, digits):
    states = []
    for _ in range(2):
        learner = Learner(spec(max_steps=2), digits / "site_2")
        learner.train_round(3)
        states.append(learner.adapter_state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_adapter_state_round_trip_and_strict_loading(trained, fedvlm_cache):
    fresh = Learner(spec(), None)
    state = trained.adapter_state()
    fresh.load_adapter_state(state)
    assert all(torch.equal(fresh.adapter_state()[k], state[k]) for k in state)
    # adapter_state returns copies: mutating them leaves the model alone.
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(trained.adapter_state()[key], state[key])

    good = fresh.adapter_state()
    missing = dict(good)
    gone = missing.pop(key)
    with pytest.raises(ValueError, match=f"missing: {key}"):
        fresh.load_adapter_state(missing)
    with pytest.raises(ValueError, match="unexpected: base_model.extra.weight"):
        fresh.load_adapter_state({**good, "base_model.extra.weight": gone})
    with pytest.raises(ValueError, match=f"wrong shape: {key} \\(1,\\) != "):
        fresh.load_adapter_state({**good, key: torch.zeros(1)})
    assert all(torch.equal(fresh.adapter_state()[k], good[k]) for k in good), "a rejected load changed the model"


def test_exported_adapter_loads_with_peft_and_gives_the_same_logits(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    config = trained.adapter_config()
    assert config["base_model_name_or_path"] == trained.base_model_path
    assert Path(config["base_model_name_or_path"]).is_dir()
    save_file(trained.adapter_state(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"])
    exported = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = trained.batches.training(trained._examples["test"][:4])
    with torch.no_grad():
        expected = trained.model(**batch).logits
        got = exported(**batch).logits
    torch.testing.assert_close(got, expected)

    # Byte-for-byte what PEFT itself would write for this model.
    trained.model.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == config
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    state = trained.adapter_state()
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


@pytest.mark.parametrize("strategy", ["F-C", "F-L"])
def test_other_strategies_export_too(fedvlm_cache, tmp_path, strategy):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForImageTextToText

    learner = Learner(TaskSpec(strategy=strategy), None)
    state = {k: v + 0.01 for k, v in learner.adapter_state().items()}
    learner.load_adapter_state(state)
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(learner.adapter_config()))
    base = AutoModelForImageTextToText.from_pretrained(learner.base_model_path)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(base, tmp_path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_evaluate_returns_sane_numbers(trained):
    metrics = trained.evaluate("test")
    assert set(metrics) == {"accuracy", "num_examples"}
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["num_examples"] == trained.num_test_examples == 132
    with pytest.raises(ValueError, match="unknown split"):
        trained.evaluate("dev")
    on_file = trained.evaluate_json(trained.data_dir / "test.json")
    assert on_file == metrics


def test_learner_without_data(fedvlm_cache):
    learner = Learner(spec(), None)
    assert learner.num_train_examples == learner.num_test_examples == 0
    with pytest.raises(ValueError, match="no training examples"):
        learner.train_round(0)
    with pytest.raises(ValueError, match="no test examples"):
        learner.evaluate()


def test_batch_schedule_covers_each_epoch_and_honours_caps():
    gen = torch.Generator().manual_seed(0)
    schedule = batch_schedule(10, 4, 2.0, 0, gen)
    assert [len(b) for b in schedule] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(schedule[:3], [])) == list(range(10))
    assert len(batch_schedule(10, 4, 0.5, 0, gen)) == 2
    assert len(batch_schedule(10, 4, 5.0, 3, gen)) == 3


def test_a_waiting_agent_builds_the_runs_model_once_in_the_background(fedvlm_cache, digits, tmp_path, caplog):
    """`Agent._prebuild_learner` (a WAIT that carries the task spec) starts the build in a thread; the first action's
    `learner()` waits for that build instead of starting another, and a second WAIT starts nothing."""
    import logging
    import threading

    from fedvlm.client.agent import Agent
    from fedvlm.client.identity import StateDir

    from .harness import wait_for

    caplog.set_level(logging.INFO, logger="fedvlm.client.agent")
    agent = Agent("127.0.0.1:1", identity=None, state=StateDir(tmp_path / "site"), data_dir=digits / "site_0")
    spec_json = TaskSpec(model="tiny-llava").to_json()
    agent._prebuild_learner(spec_json)
    agent._prebuild_learner(spec_json)
    assert [t.name for t in threading.enumerate()].count("model-build") <= 1
    wait_for(lambda: "building model tiny-llava" in caplog.text, 60, "the background build")  # before any action
    learner = agent.learner(spec_json)
    assert agent.learner(spec_json) is learner
    assert caplog.text.count("building model tiny-llava") == 1
    agent._prebuild_learner(spec_json)  # the model for this spec is resident: nothing to build
    assert "model-build" not in [t.name for t in threading.enumerate()]
