"""Built-in digits dataset layout, and LLaVA JSON validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fedvlm.data.digits import build_digits
from fedvlm.data.llava_json import DataError, load_llava_json


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The default 3-site digits layout, built once per session (shared by path with test_learner)."""
    out = tmp_path_factory.getbasetemp() / "digits"
    if not (out / "test.json").exists():
        build_digits(out)
    return out


def _ids(path: Path) -> list[str]:
    return [r["id"] for r in json.loads(path.read_text())]


def test_layout_split_is_iid_disjoint_and_covers_the_held_out_set(digits):
    sites = [digits / f"site_{i}" for i in range(3)]
    train = [set(_ids(s / "train.json")) for s in sites]
    test = [set(_ids(s / "test.json")) for s in sites]
    global_test = set(_ids(digits / "test.json"))
    assert [len(t) for t in train] == [468, 467, 467]
    assert sum(len(t) for t in test) == len(global_test) == round(1797 * 0.22)
    assert set().union(*test) == global_test
    for i in range(3):
        assert not train[i] & global_test
        for j in range(i + 1, 3):
            assert not train[i] & train[j] and not test[i] & test[j]
    # IID: every site sees every digit, in roughly equal proportion.
    for site in sites:
        labels = [r["conversations"][1]["value"] for r in json.loads((site / "train.json").read_text())]
        assert set(labels) == {str(d) for d in range(10)}
        assert max(labels.count(str(d)) for d in range(10)) < 70


def test_records_follow_the_llava_format_and_images_are_rgb_at_preset_size(digits):
    record = json.loads((digits / "site_1" / "train.json").read_text())[0]
    assert set(record) == {"id", "image", "conversations"}
    assert record["image"].startswith("images/") and record["image"].endswith(".png")
    assert record["conversations"][0] == {"from": "human", "value": "<image>\nWhat digit is shown?"}
    assert record["conversations"][1]["from"] == "gpt" and record["conversations"][1]["value"].isdigit()
    with Image.open(digits / "site_1" / record["image"]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
    examples = load_llava_json(digits / "site_1" / "train.json")
    assert len(examples) == 467 and examples[0].question == "What digit is shown?"
    assert examples[0].answer == record["conversations"][1]["value"]
    assert len(load_llava_json(digits / "test.json")) == 395


def test_build_is_deterministic_by_seed(tmp_path, digits):
    layout = build_digits(tmp_path / "again", sites=2, seed=0, test_fraction=0.22, image_size=16)
    assert layout.train_sizes == (701, 701) and sum(layout.test_sizes) == 395
    # Same seed -> same held-out set as the 3-site build; a different seed -> a different one.
    assert set(_ids(layout.test_json)) == set(_ids(digits / "test.json"))
    other = build_digits(tmp_path / "seed1", sites=1, seed=1, image_size=8)
    assert set(_ids(other.test_json)) != set(_ids(digits / "test.json"))


# ---- DataError cases ----------------------------------------------------------------------------------------


def _write(folder: Path, records, image_ok: bool = True) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if image_ok:
        Image.new("RGB", (8, 8)).save(folder / "images" / "a.png")
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def _record(**overrides):
    record = {
        "id": "r1",
        "image": "images/a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "3"}],
    }
    record.update(overrides)
    return record


def test_valid_minimal_file_loads(tmp_path):
    [example] = load_llava_json(_write(tmp_path, [_record()]))
    assert (example.id, example.question, example.answer) == ("r1", "What?", "3")
    assert example.image == (tmp_path / "images" / "a.png").resolve()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([_record(), _record(id="bad", image="images/missing.png")],
         r"record 1 \(id 'bad'\): field 'image': file 'images/missing.png' not found"),
        ([_record(conversations=[{"from": "human", "value": "<image>\nWhat?"}])],
         r"record 0 \(id 'r1'\): field 'conversations': no gpt turn"),
        ([_record(image="../outside.png")], r"record 0 \(id 'r1'\): field 'image': .*escapes the data folder"),
        ([_record(image="/etc/passwd")], r"record 0 \(id 'r1'\): field 'image': absolute path '/etc/passwd'"),
        ([_record(image="images/../../x.png")], r"field 'image': .*escapes the data folder via '\.\.'"),
        ([{"id": "n", "conversations": []}], r"record 0 \(id 'n'\): field 'image': missing"),
        ([_record(conversations="hi")], r"field 'conversations': missing or not a non-empty list"),
        ([_record(conversations=[{"from": "gpt", "value": "3"}])], r"field 'conversations': no human turn"),
        ([_record(conversations=[{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}])],
         r"field 'conversations\[1\]\.value': missing or not a string"),
        ({"not": "a list"}, r"expected a JSON list of records"),
        (["x"], r"record 0: expected an object"),
    ],
)
def test_bad_records_raise_data_error_naming_file_record_and_field(tmp_path, records, message):
    path = _write(tmp_path, records)
    with pytest.raises(DataError, match=message) as info:
        load_llava_json(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unreadable_image_and_bad_json(tmp_path):
    path = _write(tmp_path, [_record()], image_ok=False)
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"record 0 \(id 'r1'\): field 'image': 'images/a.png' is not a readable image"):
        load_llava_json(path)
    path.write_text("{oops")
    with pytest.raises(DataError, match="not readable JSON"):
        load_llava_json(path)
    with pytest.raises(DataError, match="file not found"):
        load_llava_json(tmp_path / "nope.json")


def test_symlink_escaping_the_folder_is_rejected(tmp_path):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    folder = tmp_path / "site"
    path = _write(folder, [_record(image="images/link.png")])
    (folder / "images" / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match="resolves outside the data folder"):
        load_llava_json(path)
