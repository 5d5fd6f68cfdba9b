"""Data formats: multi-turn LLaVA JSON, per-record task, the FedVLMBench release layout, multi-turn collation,
and the built-in scene datasets (real pixels, boxes, disjoint splits, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fedvlm.cli import app
from fedvlm.data.builtin import build_dataset
from fedvlm.data.llava_json import DataError, load_llava_json
from fedvlm.data.scenes import CELL, digit_pools, write_scene_split
from fedvlm.data.sources import resolve_site_data


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def _conv(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def test_multi_turn_conversation_keeps_every_exchange(tmp_path):
    _image(tmp_path / "images" / "a.png")
    record = {"id": "m", "image": "images/a.png", "task": "vqa",
              "conversations": [{"from": "system", "value": "be brief"}]
              + _conv(("<image>\nHow many?", "2"), ("Is there a 7?", "no"), ("And a 3?", "yes"))}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    [ex] = load_llava_json(tmp_path / "d.json")
    assert (ex.question, ex.answer, ex.task) == ("How many?", "2", "vqa")
    assert ex.exchanges == (("How many?", "2"), ("Is there a 7?", "no"), ("And a 3?", "yes"))


def test_several_images_per_record_go_to_the_turns_of_their_placeholders(tmp_path):
    for name in ("a", "b", "c"):
        _image(tmp_path / "images" / f"{name}.png")
    placed = {"id": "p", "image": ["images/a.png", "images/b.png", "images/c.png"],
              "conversations": _conv(("<image><image>\nSame digit?", "no"), ("<image>\nAnd this one?", "7"))}
    unplaced = {"id": "u", "image": ["images/a.png", "images/b.png"], "conversations": _conv(("Compare.", "same"))}
    (tmp_path / "d.json").write_text(json.dumps([placed, unplaced]))
    ex_placed, ex_unplaced = load_llava_json(tmp_path / "d.json")
    assert [p.name for p in ex_placed.images] == ["a.png", "b.png", "c.png"]
    assert ex_placed.image_turns == (0, 0, 1) and ex_placed.question == "Same digit?"
    assert ex_unplaced.image_turns == (0, 0)
    wrong = {**placed, "image": ["images/a.png", "images/b.png"]}
    (tmp_path / "bad.json").write_text(json.dumps([wrong]))
    with pytest.raises(DataError, match=r"record 0 \(id 'p'\): field 'conversations': 3 <image> placeholders for 2"):
        load_llava_json(tmp_path / "bad.json")


@pytest.mark.parametrize(("record", "message"), [
    ({"image": ["images/a.png", 7]}, r"record 0 \(id 'r'\): field 'image': missing, or not a non-empty string"),
    ({"conversations": [{"from": "human", "value": "<image>\nq1"}, {"from": "human", "value": "q2"},
                        {"from": "gpt", "value": "a"}]},
     r"record 0 \(id 'r'\): field 'conversations\[1\]': two human turns in a row"),
    ({"task": "ocr"}, r"record 0 \(id 'r'\): field 'task': unknown task 'ocr'"),
    ({"conversations": _conv(("<image>\nq", "a"), ("q2", " "))},
     r"record 0 \(id 'r'\): field 'conversations\[3\]\.value': the gpt turn is empty"),
])
def test_bad_multi_turn_and_task_fields_are_named(tmp_path, record, message):
    _image(tmp_path / "images" / "a.png")
    base = {"id": "r", "image": "images/a.png", "conversations": _conv(("<image>\nq", "a"))}
    base.update(record)
    (tmp_path / "d.json").write_text(json.dumps([base]))
    with pytest.raises(DataError, match=message) as info:
        load_llava_json(tmp_path / "d.json")
    assert str(tmp_path / "d.json") in str(info.value)


def _release(root: Path) -> None:
    """A miniature FedVLMBench release: images at the root, client files and a shared test file."""
    for name in ("a.png", "b.png", "images/c.png"):
        _image(root / name)
    rec = lambda i, img: {"id": i, "image": img, "conversations": _conv(("<image>\nWhat?", "x"))}  # noqa: E731
    for dist in ("iid", "non_iid"):
        for c in range(2):
            path = root / "clients" / dist / "train" / f"client_{c}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps([rec(f"{dist}{c}", "a.png"), rec("c", "c.png")]))
    (root / "test").mkdir()
    (root / "test" / "test.json").write_text(json.dumps([rec("t", "b.png")]))
    (root / "central_training").mkdir()
    (root / "central_training" / "train.json").write_text(json.dumps([rec("ct", "a.png")]))


def test_fedvlmbench_layout_is_read_as_is(tmp_path):
    _release(tmp_path / "rel")
    site = resolve_site_data(tmp_path / "rel" / "clients" / "non_iid" / "train" / "client_1.json")
    assert site.release == tmp_path / "rel"
    assert site.test == tmp_path / "rel" / "test" / "test.json"
    train, test = site.load("train"), site.load("test")
    assert [e.id for e in train] == ["non_iid1", "c"] and [e.id for e in test] == ["t"]
    assert train[0].image == (tmp_path / "rel" / "a.png").resolve()
    assert train[1].image == (tmp_path / "rel" / "images" / "c.png").resolve()  # RELEASE/images fallback
    central = resolve_site_data(tmp_path / "rel" / "central_training" / "train.json")
    assert [e.id for e in central.load("train")] == ["ct"] and central.test is not None
    # An image escaping the release root is still refused.
    bad = tmp_path / "rel" / "clients" / "iid" / "train" / "client_0.json"
    bad.write_text(json.dumps([{"id": "e", "image": "../../../../x.png", "conversations": _conv(("q", "a"))}]))
    with pytest.raises(DataError, match="escapes the data folder"):
        resolve_site_data(bad).load("train")


def test_site_folder_and_plain_file_forms(tmp_path):
    _image(tmp_path / "images" / "a.png")
    records = [{"id": "1", "image": "images/a.png", "conversations": _conv(("<image>\nq", "a"))}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    folder = resolve_site_data(tmp_path)
    assert folder.train == tmp_path / "train.json" and folder.test is None and folder.load("test") == []
    (tmp_path / "test.json").write_text(json.dumps(records))
    assert resolve_site_data(tmp_path / "train.json").test == tmp_path / "test.json"
    assert resolve_site_data(tmp_path / "test.json").test is None  # never its own test split
    with pytest.raises(DataError, match="must hold train.json"):
        resolve_site_data(tmp_path / "images")
    with pytest.raises(DataError, match="neither a site folder nor a .json file"):
        resolve_site_data(tmp_path / "images" / "a.png")


def test_multi_turn_collation_trains_every_assistant_turn(tmp_path, tmp_path_factory):
    from fedvlm.data.collate import IGNORE_INDEX, BatchBuilder, encoder_for
    from fedvlm.data.llava_json import Example
    from fedvlm.vlm.loading import load_base

    model, processor = load_base("tiny-llava", tmp_path_factory.getbasetemp() / "fedvlm-cache")
    _image(tmp_path / "a.png")
    turns = (("How many digits are there?", "2"), ("Is there a 7?", "no"))
    multi = Example("m", tmp_path / "a.png", turns[0][0], turns[0][1], turns=turns)
    single = Example("s", tmp_path / "a.png", turns[0][0], turns[0][1])
    batch = BatchBuilder(encoder_for(model, processor)).training([multi, single])
    tok = processor.tokenizer
    trained = [tok.decode([t for t in row.tolist() if t != IGNORE_INDEX]) for row in batch["labels"]]
    assert trained[0] == " 2</s> no</s>"
    assert trained[1] == " 2</s>"
    full = tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert full.endswith("ASSISTANT: 2</s>USER: Is there a 7?\nASSISTANT: no</s>")


def test_scenes_use_real_digits_with_correct_boxes_and_disjoint_pools(tmp_path):
    images, labels, train_pool, test_pool = digit_pools(0)
    assert not set(train_pool.tolist()) & set(test_pool.tolist())
    records = write_scene_split(tmp_path, "grounding", "test", 20, seed=0)
    for record in records:
        pixels = np.asarray(Image.open(tmp_path / record["image"]).convert("L"))
        assert pixels.shape == (32, 32)
        for digit, (x0, y0, x1, y1) in zip(record["digits"], record["boxes"], strict=True):
            assert (x1 - x0, y1 - y0) == (CELL, CELL)
            patch = pixels[y0:y1, x0:x1].astype(float) * 16 / 255
            matches = [i for i in test_pool if labels[i] == digit
                       and np.abs(np.clip(images[i], 0, 16) - patch).max() <= 0.1]
            assert matches, "each drawn digit is a real test-pool digit image"
        answer = record["conversations"][1]["value"]
        assert answer == "[" + ", ".join(map(str, record["boxes"][record["digits"].index(record["target"])])) + "]"
    assert write_scene_split(tmp_path / "again", "grounding", "test", 20, seed=0) == records


def test_cli_builds_every_builtin_dataset(tmp_path):
    runner = CliRunner()
    for name in ("vqa", "captioning", "grounding"):
        result = runner.invoke(app, ["data", "build", name, "--out", str(tmp_path / name), "--sites", "2",
                                     "--train-size", "20", "--test-size", "6"])
        assert result.exit_code == 0, result.output
        assert len(load_llava_json(tmp_path / name / "site_1" / "train.json")) == 10
        assert len(load_llava_json(tmp_path / name / "test.json")) == 6
    vqa = load_llava_json(tmp_path / "vqa" / "train.json")
    assert all(len(ex.exchanges) == 2 and ex.task == "vqa" for ex in vqa)
    caption = load_llava_json(tmp_path / "captioning" / "train.json")[0].answer
    assert caption.startswith(("one digit: ", "two digits: ", "three digits: "))
    result = runner.invoke(app, ["data", "build", "multitask", "--out", str(tmp_path / "mt"), "--sites", "4",
                                 "--train-size", "8", "--test-size", "2"])
    assert result.exit_code == 0, result.output
    tasks = [{ex.task for ex in load_llava_json(tmp_path / "mt" / f"site_{i}" / "train.json")} for i in range(4)]
    assert tasks == [{"classification"}, {"vqa"}, {"captioning"}, {"grounding"}]
    assert (tmp_path / "mt" / "label_heatmap.png").is_file()
    bad = runner.invoke(app, ["data", "build", "multitask", "--out", str(tmp_path / "x"), "--sites", "2"])
    assert bad.exit_code == 2 and "needs at least 4 sites" in bad.output
    assert runner.invoke(app, ["data", "build", "coco", "--out", str(tmp_path / "y")]).exit_code == 2
    assert build_dataset("vqa", tmp_path / "v2", sites=2, train_size=20, test_size=6).task_type == "vqa"


def test_hugging_face_datasets_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("FEDVLM_CACHE", str(tmp_path / "cache"))  # materialised PNGs go under the cache
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q{i}"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]}] for i in range(3)]
    features = datasets.Features({
        "image": datasets.Image(), "task": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}]})
    rows = {"image": images, "messages": messages, "task": ["vqa"] * 3}
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "hf"))
    site = resolve_site_data(tmp_path / "hf")
    examples = site.load("train")
    assert [(e.question, e.answer, e.task) for e in examples] == [(f"q{i}", f"a{i}", "vqa") for i in range(3)]
    with Image.open(examples[2].image) as img:
        assert img.getpixel((0, 0)) == (80, 0, 0)
    assert len(site.load("test")) == 1 and len(site.train_digest()) == 64
    bad = datasets.Dataset.from_dict({"image": images[:1], "conversations": [[{"from": "gpt", "value": "x"}]]},
                                      features=datasets.Features({"image": datasets.Image(), "conversations": [
                                          {"from": datasets.Value("string"), "value": datasets.Value("string")}]}))
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad \[train\]: row 0 \(id '0'\): field 'conversations': no human turn"):
        resolve_site_data(tmp_path / "bad").load("train")
