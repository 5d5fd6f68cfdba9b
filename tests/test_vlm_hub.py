"""``model = "hf:<path>"``: tiny LLaVA and Fuyu built from configs, saved, loaded through the Auto classes, one
federated round in process (two sites + FedAvg), generation; offline errors. Every other family: test_vlm_families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedvlm import adapters
from fedvlm.algorithms.fedavg import fedavg
from fedvlm.learner import Learner
from fedvlm.spec import TaskSpec, TrainSpec
from fedvlm.vlm.finetuning import find_parts

from .harness import small_sites


@pytest.fixture(scope="module")
def sites(digits, tmp_path_factory) -> list[Path]:
    """Two small sites (24 train / 6 test digits each)."""
    return small_sites(digits, tmp_path_factory.mktemp("hub-sites"), 2, 24, 6)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A LlavaForConditionalGeneration + LlavaProcessor built from configs (the tiny-llava recipe), saved."""
    from fedvlm.vlm.presets import PRESETS, _build_into

    out = tmp_path_factory.mktemp("hub-llava")
    _build_into("tiny-llava", PRESETS["tiny-llava"], out, out)  # nothing is cached: tiny presets need no weights
    return out


@pytest.fixture(scope="module")
def fuyu_dir(tmp_path_factory) -> Path:
    """A FuyuForCausalLM (Persimmon LM, fused query_key_value) + FuyuProcessor built from configs, saved."""
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuProcessor
    from transformers.models.fuyu.image_processing_pil_fuyu import FuyuImageProcessorPil

    from fedvlm.vlm.tokenizer import build_tokenizer

    tok = build_tokenizer(320)
    tok.add_special_tokens({"additional_special_tokens": ["|SPEAKER|", "|NEWLINE|", "<0x04>"]})
    processor = FuyuProcessor(
        image_processor=FuyuImageProcessorPil(size={"height": 32, "width": 32}, patch_size={"height": 8, "width": 8}),
        tokenizer=tok,
    )
    config = FuyuConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, patch_size=8, num_channels=3, max_position_embeddings=256,
                        image_token_id=tok.convert_tokens_to_ids("|SPEAKER|"), pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.08)
    torch.manual_seed(0)
    model = FuyuForCausalLM(config)
    out = tmp_path_factory.mktemp("hub-fuyu")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def one_federated_round(model_dir: Path, sites: list[Path], strategy: str = "F-CL") -> tuple[list[Learner], dict]:
    spec = TaskSpec(model=f"hf:{model_dir}", strategy=strategy, train=TrainSpec(max_steps=8, batch_size=4))
    learners = [Learner(spec, site) for site in sites]
    initial = learners[0].adapter_state()
    for learner in learners:
        result = learner.train_round(1)
        assert result.loss_last < result.loss_first
    updates = [adapters.from_bytes(adapters.to_bytes(learner.adapter_state(1))) for learner in learners]
    for update in updates:
        adapters.check_schema(adapters.schema_of(update), adapters.schema_of(initial), allow_subset=True)
    new_global = fedavg((learner.num_train_examples, iter(update.items()))
                        for learner, update in zip(learners, updates, strict=True))
    for learner in learners:
        learner.load_adapter_state(new_global)
        state = learner.adapter_state()
        assert all(torch.equal(state[k], new_global[k]) for k in new_global)
    return learners, new_global


def test_hub_llava_one_federated_round_and_generation(llava_dir, sites):
    learners, new_global = one_federated_round(llava_dir, sites)
    assert any("multi_modal_projector" in k for k in new_global) and any("lora_A" in k for k in new_global)
    metrics = learners[0].evaluate("test")
    assert metrics["num_examples"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0


def test_hub_fuyu_one_federated_round_and_generation(fuyu_dir, sites):
    learners, new_global = one_federated_round(fuyu_dir, sites)
    parts = find_parts(learners[0].model.get_base_model())
    assert parts.connector == "model.vision_embed_tokens" and parts.vision_tower is None
    assert any("vision_embed_tokens" in k for k in new_global)
    assert any("query_key_value.lora_A" in k for k in new_global), "fused attention got no LoRA"
    assert not any("lm_head" in k for k in new_global)
    metrics = learners[0].evaluate("test")
    assert metrics["num_examples"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0


def test_hub_fuyu_exports_a_peft_adapter(fuyu_dir, sites, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    learner = Learner(TaskSpec(model=f"hf:{fuyu_dir}", strategy="F-C"), None)
    state = {k: v + 0.01 for k, v in learner.adapter_state().items()}
    learner.load_adapter_state(state)
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(learner.adapter_config()))
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(fuyu_dir),
                                                                 tmp_path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_hub_id_is_not_downloaded_when_offline(monkeypatch, tmp_path):
    from fedvlm.vlm.loading import load_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        load_base("hf:fedvlm-test/does-not-exist")
    with pytest.raises(OSError, match="no such directory"):
        load_base(f"hf:{tmp_path / 'missing'}")
