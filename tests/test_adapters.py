"""Adapter bytes, header-only schema reading, schema and finiteness checks, file streaming."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
import torch

from fedvlm import adapters
from fedvlm.adapters import AdapterError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "base_model.layers.0.q_proj.lora_A.weight": torch.randn(8, 32, generator=g),
        "base_model.layers.0.q_proj.lora_B.weight": torch.randn(32, 8, generator=g),
        "connector.0.bias": torch.randn(16, generator=g).to(torch.bfloat16),
        "connector.0.weight": torch.randn(16, 4, generator=g).to(torch.float16),
        "steps": torch.tensor([3], dtype=torch.int64),
        "empty": torch.zeros(0, 5),
    }


def _raw(header: dict, payload: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def test_round_trip_and_determinism():
    t = _tensors()
    data = adapters.to_bytes(t, {"format": "pt"})
    reversed_order = dict(reversed(list(t.items())))
    assert adapters.to_bytes(reversed_order, {"format": "pt"}) == data
    assert adapters.to_bytes({k: v.clone() for k, v in t.items()}, {"format": "pt"}) == data
    back = adapters.from_bytes(data)
    assert back.keys() == t.keys()
    for k in t:
        assert back[k].dtype == t[k].dtype and torch.equal(back[k], t[k])
    assert (
        adapters.sha256_hex(data) == adapters.sha256_hex(bytes(data)) and len(adapters.sha256_hex(data)) == 64
    )


def test_non_contiguous_input_is_accepted():
    w = torch.randn(4, 6)
    data = adapters.to_bytes({"w": w.t()})
    assert torch.equal(adapters.from_bytes(data)["w"], w.t())


def test_to_bytes_rejects_bad_input():
    with pytest.raises(AdapterError):
        adapters.to_bytes({"w": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(AdapterError):
        adapters.to_bytes({"w": torch.zeros(2)}, {"k": 1})  # type: ignore[dict-item]
    with pytest.raises(AdapterError):
        adapters.to_bytes({"__metadata__": torch.zeros(2)})


def test_read_schema_agrees_with_schema_of():
    t = _tensors()
    schema = adapters.read_schema(adapters.to_bytes(t))
    assert schema == adapters.schema_of(t)
    assert schema["connector.0.bias"] == ((16,), "BF16")
    assert schema["empty"] == ((0, 5), "F32")
    assert adapters.read_schema(adapters.to_bytes({})) == {}


def test_read_schema_rejects_truncated_and_garbage():
    data = adapters.to_bytes(_tensors())
    for cut in (0, 4, 7, 8, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(AdapterError):
            adapters.read_schema(data[:cut])
        with pytest.raises(AdapterError):
            adapters.from_bytes(data[:cut])
    with pytest.raises(AdapterError, match="payload"):
        adapters.read_schema(data + b"\x00")  # trailing bytes
    for garbage in (b"\x00" * 64, b"not safetensors at all", bytes(range(256)), b"\xff" * 16):
        with pytest.raises(AdapterError):
            adapters.read_schema(garbage)
        with pytest.raises(AdapterError):
            adapters.from_bytes(garbage)


def test_read_schema_caps_header_size():
    huge = struct.pack("<Q", adapters.MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(AdapterError, match="limit"):
        adapters.read_schema(huge)
    with pytest.raises(AdapterError, match="exceeds the data"):
        adapters.read_schema(struct.pack("<Q", 1000) + b"{}")


@pytest.mark.parametrize(
    "header, payload, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "contiguous"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
            "contiguous",
        ),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "exactly"),
        ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
        ([], b"", "object"),
    ],
)
def test_read_schema_rejects_inconsistent_headers(header, payload, message):
    with pytest.raises(AdapterError, match=message):
        adapters.read_schema(_raw(header, payload))


def test_read_schema_rejects_duplicate_keys():
    entry = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    h = ('{"a":' + entry + ',"a":' + entry + "}").encode()
    with pytest.raises(AdapterError, match="duplicate"):
        adapters.read_schema(struct.pack("<Q", len(h)) + h + b"\0" * 4)


def test_schema_json_round_trip():
    schema = adapters.schema_of(_tensors())
    text = adapters.schema_to_json(schema)
    assert adapters.schema_from_json(text) == schema
    assert adapters.schema_to_json(adapters.schema_from_json(text)) == text
    for bad in ["", "[]", '{"a": [[2], "X9"]}', '{"a": [[-1], "F32"]}', '{"a": [2, "F32"]}', '{"a": [[2]]}']:
        with pytest.raises(AdapterError):
            adapters.schema_from_json(bad)


def test_check_schema_names_bad_keys():
    expected = adapters.schema_of(_tensors())
    adapters.check_schema(dict(expected), expected)
    actual = dict(expected)
    del actual["steps"]
    actual["rogue.weight"] = ((1,), "F32")
    actual["connector.0.weight"] = ((16, 5), "F16")
    actual["connector.0.bias"] = ((16,), "F32")
    with pytest.raises(AdapterError) as err:
        adapters.check_schema(actual, expected)
    msg = str(err.value)
    assert "missing key(s): steps" in msg
    assert "unexpected key(s): rogue.weight" in msg
    assert "connector.0.weight expected (16, 4) got (16, 5)" in msg
    assert "connector.0.bias expected BF16 got F32" in msg


def test_check_schema_lists_only_the_first_few():
    expected = {f"k{i:02d}": ((1,), "F32") for i in range(20)}
    with pytest.raises(
        AdapterError, match=r"20 missing key\(s\): k00, k01, k02, k03, k04, \.\.\. \(15 more\)"
    ):
        adapters.check_schema({}, expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite(bad):
    t = _tensors()
    adapters.check_finite(t)
    t["connector.0.weight"] = t["connector.0.weight"].clone()
    t["connector.0.weight"][1, 2] = bad
    with pytest.raises(AdapterError, match="connector.0.weight"):
        adapters.check_finite(t)
    # Survives a round trip through bytes, so the coordinator sees it after from_bytes.
    with pytest.raises(AdapterError, match="connector.0.weight"):
        adapters.check_finite(adapters.from_bytes(adapters.to_bytes(t)))


def test_files_stream_and_atomic_save(tmp_path):
    t = _tensors()
    path = tmp_path / "update.safetensors"
    adapters.save_file_atomic(t, path, {"round": "1"})
    assert path.read_bytes() == adapters.to_bytes(t, {"round": "1"})
    assert (path.stat().st_mode & 0o777) == 0o644
    assert adapters.read_file_schema(path) == adapters.schema_of(t)
    assert adapters.read_metadata(path) == {"round": "1"}
    streamed = dict(adapters.iter_file_tensors(path))
    assert streamed.keys() == t.keys()
    assert all(torch.equal(streamed[k], t[k]) for k in t)
    adapters.save_file_atomic({"w": torch.ones(2)}, path)  # replaces the old file
    assert [p.name for p in tmp_path.iterdir()] == ["update.safetensors"]
    assert adapters.read_file_schema(path) == {"w": ((2,), "F32")}
    assert adapters.read_metadata(path) == {}

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(adapters.to_bytes(t)[:-3])
    for reader in (
        adapters.read_file_schema,
        adapters.read_metadata,
        lambda p: list(adapters.iter_file_tensors(p)),
    ):
        with pytest.raises(AdapterError):
            reader(bad)
    with pytest.raises(AdapterError):
        adapters.read_file_schema(tmp_path / "missing.safetensors")


def test_iter_file_tensors_memory_is_one_tensor(tmp_path):
    n, size = 8, 1 << 20  # eight 4 MiB tensors
    path = tmp_path / "big.safetensors"
    adapters.save_file_atomic({f"t{i}": torch.full((size,), float(i)) for i in range(n)}, path)
    tracemalloc.start()
    try:
        total = 0.0
        for _, tensor in adapters.iter_file_tensors(path):
            total += float(tensor[0])
            del tensor
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == sum(range(n))
    # tracemalloc does not see torch's allocator; this only guards against Python-side buffering of the file.
    assert peak < 2 * 4 * size
