"""Fuzzing the two parsers that read peer bytes first: the safetensors header (fedvlm.adapters) and the signed
manifest (fedvlm.security.signing). Whatever the input, each returns or raises its refusal type, never anything
else (a RecursionError, TypeError or OverflowError would reach a site as UNKNOWN)."""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedvlm import adapters
from fedvlm.adapters import AdapterError
from fedvlm.security.signing import GlobalRecord, UpdateManifest

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F4", "f32", ""]) | json_values
shapes = st.lists(st.integers(min_value=-2, max_value=2**70), max_size=3) | json_values
offsets = st.lists(st.integers(min_value=-2, max_value=2**70), min_size=0, max_size=3) | json_values
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}) | json_values
metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=8) | json_values, max_size=3) | json_values
headers = st.dictionaries(st.text(max_size=12) | st.just("__metadata__"), entries, max_size=5).flatmap(
    lambda h: st.just(h) | metadata.map(lambda m: {**h, "__metadata__": m})) | json_values


def nested(depth: int, opener: str) -> str:
    """JSON nested `depth` deep: lists, or objects."""
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@st.composite
def safetensors_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["json", "nested", "raw", "valid"]))
    if kind == "raw":
        return draw(st.binary(max_size=200))
    if kind == "valid":
        n = draw(st.integers(0, 3))
        data = adapters.to_bytes({f"t{i}": torch.zeros(draw(st.integers(0, 3))) for i in range(n)})
        cut = draw(st.integers(0, len(data)))  # truncated, or with bytes flipped
        flip = draw(st.integers(0, max(0, len(data) - 1)))
        data = data[:cut] if draw(st.booleans()) else data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1:]
        return data
    if kind == "nested":
        header = nested(draw(st.integers(900, 5000)), draw(st.sampled_from(["[", "{"]))).encode()
    else:
        header = json.dumps(draw(headers)).encode()  # NaN / Infinity tokens included
    length = draw(st.sampled_from([len(header), len(header) + 1, max(0, len(header) - 1), 2**64 - 1]))
    return struct.pack("<Q", length) + header + draw(st.binary(max_size=64))


@FUZZ
@given(safetensors_bytes())
def test_the_safetensors_header_parser_raises_only_adapter_errors(data):
    with contextlib.suppress(AdapterError):
        adapters.read_schema(data)
        adapters.from_bytes(data)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "update.safetensors"
        path.write_bytes(data)
        with contextlib.suppress(AdapterError):
            adapters.read_file_schema(path, max_header_bytes=4096, max_tensors=2)


VALID = dict(federation_id="f" * 32, run_id="r1", round=1, client="a", base_digest="0" * 64, sha256="1" * 64,
             size=10, num_examples=5, nonce="2" * 32, created_at=1.5)


@st.composite
def manifest_texts(draw) -> str | bytes:
    kind = draw(st.sampled_from(["fields", "json", "nested", "raw"]))
    if kind == "raw":
        return draw(st.binary(max_size=200) | st.text(max_size=200))
    if kind == "nested":
        return nested(draw(st.integers(900, 5000)), draw(st.sampled_from(["[", "{"])))
    if kind == "json":
        return json.dumps(draw(json_values))
    fields = dict(VALID)
    for name in draw(st.lists(st.sampled_from([*VALID, "extra"]), max_size=3)):
        if draw(st.booleans()):
            fields[name] = draw(json_values)
        else:
            fields.pop(name, None)
    return json.dumps(fields)


@FUZZ
@given(manifest_texts())
def test_the_manifest_parser_raises_only_value_errors(text):
    for record in (UpdateManifest, GlobalRecord):
        try:
            parsed = record.from_json(text)
        except ValueError:
            continue
        assert record.from_json(parsed.to_json()) == parsed  # a parsed record round-trips: its bytes are signable
