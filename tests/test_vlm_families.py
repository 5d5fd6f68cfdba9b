"""Every Hugging Face VLM family fedvlm supports, as a tiny random checkpoint built offline from the family's real
config, model and processor classes (fedvlm.vlm.zoo) and loaded through ``hf:<dir>``: the labels cover exactly the
answers, training lowers the loss, generation runs, and the exported adapter loads with ``PeftModel.from_pretrained``
and reproduces the site's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedvlm.data.collate import IGNORE_INDEX
from fedvlm.data.llava_json import Example
from fedvlm.learner import Learner
from fedvlm.spec import TaskSpec, TrainSpec
from fedvlm.vlm import zoo
from fedvlm.vlm.families import FAMILIES, UnknownFamilyError
from fedvlm.vlm.finetuning import apply_strategy, find_parts

from .harness import small_sites

FAMILY_NAMES = sorted(zoo.ZOO)


@pytest.fixture(scope="session")
def zoo_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "zoo"
    out = {}
    for family in FAMILY_NAMES:
        target = root / family
        if not (target / "config.json").exists():
            zoo.build(family, target)
        out[family] = target
    return out


@pytest.fixture(scope="module")
def site(digits, tmp_path_factory) -> Path:
    """24 train / 4 test digits."""
    return small_sites(digits, tmp_path_factory.mktemp("family-site"), 1, 24, 4)[0]


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> list[Example]:
    """One single-turn, one two-turn and one two-image example (the second image in the second turn)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("family-images")
    a, b = root / "a.png", root / "b.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(a)
    Image.new("RGB", (48, 32), (200, 20, 30)).save(b)
    turns = (("What digit is it?", "7"), ("And the colour?", "green"))
    return [Example("single", a, "What digit is it?", "7"),
            Example("multi", a, turns[0][0], turns[0][1], turns=turns),
            Example("two-images", a, turns[0][0], turns[0][1], turns=turns, more_images=(b,), turn_of_image=(0, 1))]


def _learner(model_dir: Path, data: Path | None, **train) -> Learner:
    spec = TaskSpec(model=f"hf:{model_dir}", train=TrainSpec(batch_size=4, max_steps=8, max_new_tokens=3, **train))
    return Learner(spec, data)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_labels_cover_exactly_the_answers(family, zoo_dirs, examples):
    learner = _learner(zoo_dirs[family], None)
    assert learner.model.get_base_model().config.model_type == family
    usable = examples if FAMILIES[family].prompt == "chat" else examples[:1]
    batch = learner.batches.training(usable)
    tok = learner.processor.tokenizer
    stops = learner.batches.encoder.stop_tokens
    for example, row in zip(usable, batch["labels"], strict=True):
        labelled = tok.decode([t for t in row.tolist() if t != IGNORE_INDEX])
        for stop in stops:
            labelled = labelled.replace(stop, "|")
        answers = [a.strip() for a in labelled.split("|") if a.strip()]
        assert answers == [answer for _, answer in example.exchanges], (family, labelled)
    for key in FAMILIES[family].extra_inputs:
        assert key in batch, f"{family}: the batch lacks {key}"
    with torch.no_grad():
        assert torch.isfinite(learner.model(**batch).loss)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_trains_generates_and_exports(family, zoo_dirs, site, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    learner = _learner(zoo_dirs[family], site)
    result = learner.train_round(1)
    assert result.steps == 6 and result.loss_last < result.loss_first, (family, result)
    metrics = learner.evaluate("test")
    assert metrics["num_examples"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0

    save_file(learner.adapter_state(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(learner.adapter_config()))
    base = AutoModelForImageTextToText.from_pretrained(zoo_dirs[family])
    exported = PeftModel.from_pretrained(base, tmp_path).eval()
    batch = learner.batches.training(learner._examples["test"])
    learner.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, learner.model(**batch).logits)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_only_the_connector_and_lm_lora_train(family, zoo_dirs):
    from transformers import AutoModelForImageTextToText

    from fedvlm.spec import LoraSpec

    model = AutoModelForImageTextToText.from_pretrained(zoo_dirs[family])
    parts = find_parts(model)
    lm_linears = [n for n, m in model.named_modules()
                  if n.startswith(parts.language_model + ".") and isinstance(m, torch.nn.Linear)]
    peft_model = apply_strategy(model, "F-CL", LoraSpec(targets=("all-linear",)), seed=0)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    connector = [n for n in trainable if any(f".{c}.modules_to_save.default." in n for c in parts.connectors)]
    lora = [n for n in trainable if f".{parts.language_model}." in n and ".lora_" in n]
    assert connector and sorted(connector + lora) == sorted(trainable)
    assert len(lora) == 2 * len(lm_linears)  # A and B on every LM linear layer (the head is outside the LM)


def test_an_unknown_family_fails_with_one_line_naming_the_row_to_add(zoo_dirs, tmp_path):
    import shutil

    model_dir = tmp_path / "renamed"
    shutil.copytree(zoo_dirs["llava"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    model.config.model_type = "llava_unheard_of"
    with pytest.raises(UnknownFamilyError) as err:
        find_parts(model)
    message = str(err.value)
    assert "\n" not in message and "'llava_unheard_of'" in message and "qwen2_5_vl" in message
    assert "fedvlm.vlm.families.FAMILIES" in message
    assert config["model_type"] == "llava"


def test_video_processors_are_left_out_where_torchvision_cannot_load(zoo_dirs):
    from fedvlm.vlm.processors import load_processor, torchvision_available

    processor = load_processor(str(zoo_dirs["qwen2_5_vl"]))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    if not torchvision_available():
        assert "video_processor" not in type(processor).get_attributes()
    assert processor.image_processor.patch_size == 4  # the checkpoint's own settings, not the class defaults
