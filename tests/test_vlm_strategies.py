"""Every (tiny preset, strategy) pair: exact trainable set, loss goes down, the update round-trips through
safetensors and the coordinator's subset schema check, greedy generation (F-CL); F-2stage stages; PEFT export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fedvlm import adapters
from fedvlm.learner import Learner
from fedvlm.spec import SpecError, TaskSpec, TrainSpec
from fedvlm.train import generate_answers
from fedvlm.vlm.finetuning import find_parts
from fedvlm.vlm.presets import TINY_PRESETS, parameter_counts

STRATEGIES = ("F-C", "F-L", "F-CL", "F-2stage")
SWITCH = 2


@pytest.fixture(scope="session")
def small_sites(digits, tmp_path_factory) -> list[Path]:
    """Two sites of 32 training / 8 test digits each (a Learner validates every image: small folders keep it fast)."""
    sites = []
    for i in range(2):
        source = digits / f"site_{i}"
        out = tmp_path_factory.getbasetemp() / f"small-digits-{i}"
        if not (out / "test.json").exists():
            (out / "images").mkdir(parents=True, exist_ok=True)
            for split, count in (("train", 32), ("test", 8)):
                records = json.loads((source / f"{split}.json").read_text())[:count]
                for record in records:
                    shutil.copy(source / record["image"], out / record["image"])
                (out / f"{split}.json").write_text(json.dumps(records))
        sites.append(out)
    return sites


def task(model: str, strategy: str, **train) -> TaskSpec:
    train = {"max_steps": 8, "batch_size": 4, **train}
    return TaskSpec(model=model, strategy=strategy, switch_round=SWITCH if strategy == "F-2stage" else 0,
                    train=TrainSpec(**train))


def trainable(learner: Learner) -> set[str]:
    return {n for n, p in learner.model.named_parameters() if p.requires_grad}


def lm_linears(base: nn.Module, parts) -> set[str]:
    """Every nn.Linear of the language model (a LoRA-wrapped one shows up as ``<name>.base_layer``)."""
    return {n.removesuffix(".base_layer") for n, m in base.named_modules()
            if n.startswith(parts.language_model + ".") and isinstance(m, nn.Linear) and ".lora_" not in n}


def expected_trainable(learner: Learner, stage: str | None) -> set[str]:
    """What the strategy says, derived independently from the base model's module tree."""
    strategy = learner.spec.strategy
    base = learner.model.get_base_model()
    parts = find_parts(base)
    want: set[str] = set()
    lora = strategy in ("F-L", "F-CL") or (strategy == "F-2stage" and stage == "lora")
    connector = strategy in ("F-C", "F-CL") or (strategy == "F-2stage" and stage == "connector")
    if lora:
        for name in lm_linears(base, parts):
            want |= {f"base_model.model.{name}.lora_{ab}.default.weight" for ab in "AB"}
    if connector:
        conn = base.get_submodule(parts.connector).original_module
        want |= {f"base_model.model.{parts.connector}.modules_to_save.default.{n}" for n, _ in conn.named_parameters()}
    return want


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("preset", sorted(TINY_PRESETS))
def test_strategy_trains_exactly_its_parameters(fedvlm_cache, small_sites, preset, strategy):
    learner = Learner(task(preset, strategy), small_sites[0])
    full = learner.adapter_state()
    initial_schema = adapters.schema_of(full)

    # LoRA layers: every nn.Linear of the language model (fused query_key_value included), nothing outside it.
    base = learner.model.get_base_model()
    parts = find_parts(base)
    linears = lm_linears(base, parts)
    assert len(linears) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); the head is outside the LM
    lora_layers = {n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert lora_layers == (linears if strategy != "F-C" else set())

    result = learner.train_round(1)
    stage = learner.stage(1)
    assert trainable(learner) == expected_trainable(learner, stage)
    assert not any(".vision_tower." in n for n in trainable(learner))
    assert result.loss_last < result.loss_first

    update = learner.adapter_state(1)
    if strategy == "F-2stage":
        assert stage == "connector" and update.keys() < full.keys()
        assert not any(".lora_" in k for k in update)
    else:
        assert update.keys() == full.keys()
    changed = [k for k in update if not torch.equal(update[k], full[k])]
    assert changed, "training changed no tensor of the update"
    back = adapters.from_bytes(adapters.to_bytes(update))
    assert back.keys() == update.keys() and all(torch.equal(back[k], update[k]) for k in update)
    adapters.check_schema(adapters.schema_of(back), initial_schema, allow_subset=True)

    if strategy == "F-CL":  # generation-based evaluation works on every family: greedy answers to image prompts
        answers = generate_answers(learner.model, learner.batches, learner._examples["test"][:3], 3, 3)
        assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
        metrics = learner.evaluate("test")
        assert metrics["num_examples"] == 8 and 0.0 <= metrics["accuracy"] <= 1.0


def test_two_stage_switches_at_the_configured_round(fedvlm_cache, small_sites):
    site = Learner(task("tiny-llava", "F-2stage"), small_sites[1])
    initial = site.adapter_state()
    connector_keys = {k for k in initial if ".lora_" not in k}
    lora_keys = set(initial) - connector_keys
    assert connector_keys and lora_keys

    site.train_round(1)
    first = site.adapter_state(1)
    assert set(first) == connector_keys
    # Coordinator side: tensors not in the updates keep the base global's values.
    global_1 = {**initial, **first}

    fresh = Learner(task("tiny-llava", "F-2stage"), small_sites[0])  # another site loads the global
    fresh.load_adapter_state(global_1)
    assert fresh.stage(SWITCH - 1) == "connector" and fresh.stage(SWITCH) == fresh.stage(SWITCH + 3) == "lora"
    fresh.train_round(SWITCH)
    second = fresh.adapter_state(SWITCH)
    assert set(second) == lora_keys
    assert any(not torch.equal(second[k], initial[k]) for k in lora_keys if "lora_B" in k)
    after = fresh.adapter_state()
    assert all(torch.equal(after[k], first[k]) for k in connector_keys), "the connector moved in stage 2"
    assert all(not p.requires_grad for n, p in fresh.model.named_parameters() if ".modules_to_save." in n)


@pytest.mark.parametrize("preset", ["tiny-llava-linear", "tiny-llava-mlp6x", "tiny-encoder-free"])
def test_exported_adapter_loads_with_peft_and_carries_the_connector(fedvlm_cache, small_sites, tmp_path, preset):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    learner = Learner(task(preset, "F-CL", max_steps=3), small_sites[0])
    learner.train_round(1)
    config = learner.adapter_config()
    state = learner.adapter_state()
    assert config["modules_to_save"] == ["model.multi_modal_projector"]
    assert any("multi_modal_projector" in k for k in state)
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"])
    assert type(base).__name__ == "FedvlmLlavaForConditionalGeneration"
    exported = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = learner.batches.training(learner._examples["test"][:3])
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, learner.model(**batch).logits)


def test_connectors_and_families_are_what_the_presets_say(fedvlm_cache):
    counts = {name: parameter_counts(name) for name in TINY_PRESETS}
    assert counts["tiny-encoder-free"]["vision"] == 0
    assert counts["tiny-llava-linear"]["connector"] == 64 * 128 + 128  # one Linear(vision 64 -> text 128)
    assert counts["tiny-llava"]["connector"] == 64 * 128 + 128 + 128 * 128 + 128
    assert counts["tiny-llava-mlp6x"]["connector"] == 64 * 128 + 128 + 5 * (128 * 128 + 128)
    assert counts["tiny-encoder-free"]["connector"] == 8 * 8 * 3 * 128 + 128  # linear patch embedding


def test_switch_round_validation():
    assert TaskSpec(strategy="F-2stage", switch_round=3).switch_round == 3
    with pytest.raises(SpecError, match="task.switch_round: F-2stage needs"):
        TaskSpec(strategy="F-2stage")
    with pytest.raises(SpecError, match="task.switch_round: only used by strategy F-2stage"):
        TaskSpec(strategy="F-CL", switch_round=2)
    with pytest.raises(SpecError, match="task.switch_round: expected int"):
        TaskSpec.from_dict({"strategy": "F-2stage", "switch_round": "2"})
    spec = TaskSpec.from_dict({"strategy": "F-2stage", "switch_round": 2})
    assert TaskSpec.from_json(spec.to_json()) == spec


def test_unknown_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
    with pytest.raises(ValueError, match="model type 'gpt2'.*not a VLM family fedvlm knows.*known: fedvlm_llava"):
        find_parts(model)


def test_models_cli_lists_and_builds(fedvlm_cache, tmp_path):
    from typer.testing import CliRunner

    from fedvlm.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    for name in TINY_PRESETS:
        assert name in listed.output
    assert "encoder-free" in listed.output and "482,944" in listed.output
    built = runner.invoke(app, ["models", "build", "tiny-encoder-free", "--out", str(tmp_path / "m")])
    assert built.exit_code == 0, built.output
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    bad = runner.invoke(app, ["models", "build", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown preset" in bad.output
