"""Tiny preset: deterministic offline build, atomic cache, loading, and the strategies' trainable parameters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from fedvlm.spec import LoraSpec
from fedvlm.vlm import presets
from fedvlm.vlm.finetuning import apply_strategy
from fedvlm.vlm.loading import load_base
from fedvlm.vlm.presets import PRESET_INFO_FILE, PRESETS, preset_dir, preset_hash


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_preset_build_is_deterministic_and_named_by_hash(tmp_path, fedvlm_cache):
    first = preset_dir("tiny-llava", fedvlm_cache)
    second = preset_dir("tiny-llava", tmp_path / "other")
    assert first.name == second.name == f"tiny-llava-{preset_hash('tiny-llava')}"
    assert first.parent == fedvlm_cache / "models"
    a, b = _files(first), _files(second)
    assert {"model.safetensors", "config.json", "tokenizer.json", PRESET_INFO_FILE} <= set(a)
    assert a == b, "two builds differ in " + ", ".join(k for k in a if a[k] != b.get(k))


def test_preset_dir_reuses_cache_and_defaults_to_env(fedvlm_cache):
    built = preset_dir("tiny-llava")  # FEDVLM_CACHE is the session cache
    assert built.parent == fedvlm_cache / "models"
    before = (built / "model.safetensors").stat().st_mtime_ns
    assert preset_dir("tiny-llava") == built
    assert (built / "model.safetensors").stat().st_mtime_ns == before


def test_concurrent_builder_loses_the_rename_cleanly(tmp_path, fedvlm_cache, monkeypatch):
    winner = preset_dir("tiny-llava", fedvlm_cache)
    cache = tmp_path / "race"
    final = cache / "models" / winner.name
    real_build = presets._build_into

    def build_while_another_process_finishes_first(name, preset, out, root):
        real_build(name, preset, out, root)
        shutil.copytree(winner, final)  # the other process renames its copy into place first

    monkeypatch.setattr(presets, "_build_into", build_while_another_process_finishes_first)
    assert preset_dir("tiny-llava", cache) == final
    assert [p.name for p in (cache / "models").iterdir()] == [winner.name], "temporary build dir left behind"


def test_unknown_preset_is_a_clear_error(fedvlm_cache):
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        preset_dir("nope", fedvlm_cache)


def test_load_base_preset_and_hf_path_are_the_same_model(fedvlm_cache):
    model, processor = load_base("tiny-llava")
    other, _ = load_base("hf:" + str(preset_dir("tiny-llava")))
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert not model.training
    for (name, p), (_, q) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    # The processor expands <image> into one token per patch.
    from PIL import Image

    enc = processor(text=["USER: <image>\nWhat digit is shown?\nASSISTANT:"], images=[Image.new("RGB", (32, 32))])
    image_id = model.config.image_token_index
    assert enc["input_ids"][0].count(image_id) == PRESETS["tiny-llava"].image_seq_length == 16
    # and the tokenizer has a real end-of-sequence token, so generation stops.
    assert processor.tokenizer.eos_token_id == model.generation_config.eos_token_id == 2


@pytest.fixture(scope="module")
def base_model(fedvlm_cache):
    return load_base("tiny-llava")[0]


def _trainable(base_model, strategy: str, lora: LoraSpec = LoraSpec()) -> list[str]:
    import copy

    model = apply_strategy(copy.deepcopy(base_model), strategy, lora, seed=0)
    return [n for n, p in model.named_parameters() if p.requires_grad]


LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.parametrize("strategy", ["F-C", "F-L", "F-CL"])
def test_strategy_trains_exactly_its_parameters(base_model, strategy):
    names = _trainable(base_model, strategy)
    assert names
    assert not [n for n in names if "vision_tower" in n], "vision tower must stay frozen"
    connector = [n for n in names if ".multi_modal_projector.modules_to_save.default." in n]
    lora = [n for n in names if ".language_model." in n and (".lora_A." in n or ".lora_B." in n)]
    assert sorted(connector + lora) == sorted(names), "something else than LoRA-on-LM or connector trains"
    assert bool(connector) == (strategy in ("F-C", "F-CL"))
    assert bool(lora) == (strategy in ("F-L", "F-CL"))
    if lora:  # "all-linear": every LM linear layer of both layers, A and B
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == LM_LINEARS
        assert len(lora) == 2 * len(LM_LINEARS) * PRESETS["tiny-llava"].text_layers
    if connector:
        assert len(connector) == 4  # linear_1 / linear_2, weight + bias


def test_strategy_lora_targets_are_restricted_to_the_language_model(base_model):
    names = _trainable(base_model, "F-L", LoraSpec(targets=("q_proj", "v_proj")))
    assert len(names) == 2 * 2 * 2  # 2 LM layers x {q, v} x {A, B}; the CLIP q_proj/v_proj are not touched
    assert all(".language_model." in n for n in names)


def test_strategy_errors_name_the_problem(base_model):
    with pytest.raises(ValueError, match="unknown strategy 'F-X'"):
        _trainable(base_model, "F-X")
    assert len(_trainable(base_model, "F-2stage")) == len(_trainable(base_model, "F-CL"))  # both parts in the adapter
    with pytest.raises(ValueError, match="task.lora.targets: fc1 not linear layers of the language model"):
        _trainable(base_model, "F-L", LoraSpec(targets=("fc1",)))
