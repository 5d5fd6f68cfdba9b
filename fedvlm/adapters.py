"""Adapters as named tensors in safetensors format: bytes <-> tensors, schema checks, digests.

Safetensors only: no pickle anywhere. Bytes received from a peer should go through :func:`read_schema` first
(it parses only the header, without materialising a tensor, and rejects malformed or oversized headers), then
:func:`check_schema` against the expected schema, then :func:`from_bytes` and :func:`check_finite`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fedvlm.adapter_limits import MAX_HEADER_BYTES
from fedvlm.atomic import write_bytes_atomic

__all__ = [
    "AdapterError",
    "LimitExceeded",
    "header_length",
    "Schema",
    "MAX_HEADER_BYTES",
    "to_bytes",
    "from_bytes",
    "read_schema",
    "read_file_schema",
    "read_metadata",
    "schema_to_json",
    "schema_from_json",
    "schema_of",
    "check_schema",
    "check_finite",
    "sha256_hex",
    "iter_file_tensors",
    "save_file_atomic",
]

Schema = dict[str, tuple[tuple[int, ...], str]]
"""Tensor name -> (shape, safetensors dtype string such as ``"F32"``)."""

# Safetensors metadata key under which the initial adapter carries its PEFT adapter_config.json (as JSON).
ADAPTER_CONFIG_METADATA = "fedvlm.adapter_config"
# ... and the base model it was built on (JSON: the task's model, the SHA-256 of the base weights), carried by every
# global, so each site checks that its own base is the same before it trains.
BASE_MODEL_METADATA = "fedvlm.base_model"
_SHOWN = 5  # how many offending keys each part of a schema-mismatch message lists

# Byte-aligned safetensors dtypes and their item sizes; sub-byte formats (F4, F6_*) are not accepted.
_ITEM_SIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

_TORCH_DTYPE = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}
for _name, _code in (
    ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
    ("float8_e5m2", "F8_E5M2"), ("float8_e4m3fn", "F8_E4M3"), ("float8_e8m0fnu", "F8_E8M0"),
):  # fmt: skip
    if hasattr(torch, _name):
        _TORCH_DTYPE[getattr(torch, _name)] = _code


class AdapterError(ValueError):
    """Adapter bytes or tensors are malformed, do not match the expected schema, or hold non-finite values."""


class LimitExceeded(AdapterError):
    """A header is larger, or holds more tensors, than the caller allows; `limit` is "header_bytes" or
    "tensors_per_update"."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


# ----------------------------------------------------------------------------------------------- bytes


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, Mapping):
        raise AdapterError("tensors must be a mapping of name -> tensor")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise AdapterError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise AdapterError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterError("metadata must map str -> str")
    return dict(metadata)


def to_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (moved to CPU, made contiguous) to safetensors bytes.

    Deterministic: equal names, dtypes, shapes, values and metadata give identical bytes (safetensors orders
    tensors by dtype alignment and name, independent of dict order). Tensors sharing storage are rejected by
    safetensors; pass clones. Raises :class:`AdapterError`.
    """
    prepared = _prepare(tensors)
    try:
        return _st_save(prepared, metadata=_check_metadata(metadata))
    except (ValueError, RuntimeError, TypeError) as exc:
        raise AdapterError(f"cannot serialise adapter: {exc}") from exc


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into CPU tensors (copies; ``data`` can be discarded).

    The header is validated with :func:`read_schema` first; anything malformed raises :class:`AdapterError`,
    never a raw safetensors/torch exception. Does not check values (see :func:`check_finite`).
    """
    read_schema(data)
    try:
        return _st_load(bytes(data))
    except Exception as exc:  # safetensors raises its own SafetensorError; never leak it to callers
        raise AdapterError(f"malformed safetensors data: {exc}") from exc


def _parse_header(header: bytes, data_len: int, max_tensors: int | None = None) -> tuple[Schema, dict[str, str]]:
    """Validate a safetensors JSON header against a payload of ``data_len`` bytes; return schema, metadata."""
    # Every entry holds the key "data_offsets" (a tensor name or metadata string can only hold it escaped, but a
    # tensor named data_offsets counts twice): counting it bounds the entries before json builds any object.
    if max_tensors is not None and header.count(b'"data_offsets"') > max_tensors:
        raise LimitExceeded("tensors_per_update",
                            f"safetensors header holds more than the limit of {max_tensors} tensors")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise AdapterError("safetensors header has duplicate keys")
        return obj

    try:
        obj = json.loads(header.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"safetensors header is not valid JSON: {exc}") from exc
    except RecursionError:
        raise AdapterError("safetensors header is nested too deeply") from None
    if not isinstance(obj, dict):
        raise AdapterError("safetensors header must be a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError("safetensors __metadata__ must map str -> str")

    schema: Schema = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in obj.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise AdapterError(f"{name}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEM_SIZE:
            raise AdapterError(f"{name}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise AdapterError(f"{name}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise AdapterError(f"{name}: data_offsets must be [begin, end] with 0 <= begin <= end")
        nbytes = math.prod(shape) * _ITEM_SIZE[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise AdapterError(
                f"{name}: data_offsets span {offsets[1] - offsets[0]} bytes but shape {tuple(shape)} "
                f"of {dtype} needs {nbytes}"
            )
        schema[name] = (tuple(shape), dtype)
        spans.append((offsets[0], offsets[1], name))

    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise AdapterError(f"{name}: tensor data is not contiguous (gap or overlap at byte {begin})")
        position = end
    if position != data_len:
        raise AdapterError(f"tensor data covers {position} bytes but the payload has {data_len}")
    return schema, meta


def header_length(prefix: bytes, total_len: int, max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """The header length that the first 8 bytes of safetensors data announce, checked against the size of the data
    (`total_len` bytes) and `max_header_bytes` (:class:`LimitExceeded`), before any header byte is read."""
    if len(prefix) < 8:
        raise AdapterError("not safetensors data: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > max_header_bytes:
        raise LimitExceeded("header_bytes",
                            f"safetensors header of {n} bytes exceeds the limit of {max_header_bytes} bytes")
    if 8 + n > total_len:
        raise AdapterError(f"safetensors header length {n} exceeds the data ({total_len} bytes): truncated?")
    return n


def read_schema(data: bytes) -> Schema:
    """Schema of safetensors bytes from the header alone; no tensor is materialised.

    Guarantees on return: the header is a JSON object (at most ``MAX_HEADER_BYTES``) with no duplicate keys,
    every entry has a supported dtype, a non-negative integer shape and offsets whose span equals the
    shape's byte size, and the tensors' data ranges tile the payload exactly (no gap, overlap or trailing
    bytes). Raises :class:`AdapterError` otherwise.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AdapterError("adapter data must be bytes")
    view = memoryview(data)
    n = header_length(bytes(view[:8]), len(view))
    return _parse_header(bytes(view[8 : 8 + n]), len(view) - 8 - n)[0]


def metadata_of(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (``{}`` if absent), after validating the header as
    :func:`read_schema` does."""
    view = memoryview(data)
    n = header_length(bytes(view[:8]), len(view))
    return _parse_header(bytes(view[8 : 8 + n]), len(view) - 8 - n)[1]


def read_file_schema(path: Path, max_header_bytes: int = MAX_HEADER_BYTES, max_tensors: int | None = None) -> Schema:
    """:func:`read_schema` for a file, reading only its header (same guarantees, same errors). A header over
    `max_header_bytes`, or with more than `max_tensors` entries, raises :class:`LimitExceeded` before it is read or
    parsed, so memory stays O(`max_header_bytes`)."""
    return _read_file_header(path, max_header_bytes, max_tensors)[0]


def read_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` (str -> str, ``{}`` if absent) of a safetensors file, after validating its header
    exactly as :func:`read_file_schema` does."""
    return _read_file_header(path)[1]


def _read_file_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES,
                      max_tensors: int | None = None) -> tuple[Schema, dict[str, str]]:
    path = Path(path)
    try:
        with path.open("rb") as f:
            total = os.fstat(f.fileno()).st_size
            n = header_length(f.read(8), total, max_header_bytes)
            header = f.read(n)
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc}") from exc
    if len(header) != n:
        raise AdapterError(f"{path}: file shrank while reading its header")
    return _parse_header(header, total - 8 - n, max_tensors)


# ----------------------------------------------------------------------------------------------- tensors


def schema_to_json(schema: Schema) -> str:
    """Compact sorted-key JSON of a schema, ``{"name": [[dims...], "F32"], ...}``; :func:`schema_from_json`
    reverses it exactly."""
    body = {name: [list(shape), dtype] for name, (shape, dtype) in schema.items()}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def schema_from_json(text: str) -> Schema:
    """Parse :func:`schema_to_json` output; :class:`AdapterError` naming the bad entry if malformed."""
    try:
        obj = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"schema is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise AdapterError("schema JSON must be an object")
    schema: Schema = {}
    for name, entry in obj.items():
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[0])
            or entry[1] not in _ITEM_SIZE
        ):
            raise AdapterError(
                f"schema entry {name!r} must be [[non-negative dims...], dtype], got {entry!r}"
            )
        schema[name] = (tuple(entry[0]), entry[1])
    return schema


def _dtype_code(name: str, dtype: torch.dtype) -> str:
    try:
        return _TORCH_DTYPE[dtype]
    except KeyError:
        raise AdapterError(f"{name}: dtype {dtype} has no safetensors equivalent") from None


def schema_of(tensors: Mapping[str, torch.Tensor]) -> Schema:
    """Schema of in-memory tensors, in the same form :func:`read_schema` returns."""
    return {name: (tuple(t.shape), _dtype_code(name, t.dtype)) for name, t in tensors.items()}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def check_schema(actual: Schema, expected: Schema, allow_subset: bool = False) -> None:
    """Return None iff ``actual`` has exactly the keys, shapes and dtypes of ``expected`` (with ``allow_subset``:
    a non-empty subset of its keys, each with the expected shape and dtype).

    Otherwise raise :class:`AdapterError` whose message lists (the first few of) the missing keys, the
    unexpected keys, the shape mismatches and the dtype mismatches, each with its key name.
    """
    if allow_subset and not actual:
        raise AdapterError("adapter schema mismatch: the update holds no tensor")
    missing = [] if allow_subset else sorted(expected.keys() - actual.keys())
    unexpected = sorted(actual.keys() - expected.keys())
    shapes, dtypes = [], []
    for name in sorted(expected.keys() & actual.keys()):
        (a_shape, a_dtype), (e_shape, e_dtype) = actual[name], expected[name]
        if tuple(a_shape) != tuple(e_shape):
            shapes.append(f"{name} expected {tuple(e_shape)} got {tuple(a_shape)}")
        if a_dtype != e_dtype:
            dtypes.append(f"{name} expected {e_dtype} got {a_dtype}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes)}")
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es): {_listing(dtypes)}")
    if problems:
        raise AdapterError("adapter schema mismatch: " + "; ".join(problems))


_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # aminmax is implemented for these


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Return None iff every floating-point tensor is free of NaN and Inf (integer/bool tensors always pass).

    Otherwise raise :class:`AdapterError` naming the first offending tensor (in sorted name order).
    """
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype in _MINMAX_DTYPES:
            # One fused reduction, no temporaries: NaN propagates into min and max, +-Inf is an extreme.
            lo, hi = torch.aminmax(t) if t.numel() else (torch.zeros(()), torch.zeros(()))
            finite = bool(torch.isfinite(lo) & torch.isfinite(hi))
        elif t.is_complex():
            finite = bool(torch.isfinite(t).all())
        elif t.is_floating_point():  # e.g. float8: isfinite is not implemented for it, float32 holds its values
            finite = bool(torch.isfinite(t.float()).all())
        else:
            finite = True
        if not finite:
            raise AdapterError(f"{name}: tensor contains NaN or Inf")


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of ``data`` (64 characters)."""
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------- files


def iter_file_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a safetensors file one at a time, in sorted name order, on CPU.

    The header is validated first (:func:`read_file_schema`); the file is memory-mapped, so memory stays
    O(one tensor) as long as the caller drops each tensor before taking the next. :class:`AdapterError`
    on a malformed file.
    """
    path = Path(path)
    names = sorted(read_file_schema(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except AdapterError:
        raise
    except Exception as exc:  # safetensors' own error type; never leak it to callers
        raise AdapterError(f"cannot read tensors from {path}: {exc}") from exc


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as a safetensors file atomically: temp file in the same directory, fsync, rename.

    Readers see either the previous file or the complete new one. Same bytes as :func:`to_bytes`; mode 0644.
    """
    write_bytes_atomic(Path(path), to_bytes(tensors, metadata), 0o644)
