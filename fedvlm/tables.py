"""TOML / JSON tables -> frozen dataclasses: the one set of type rules every config file is read with.

The task spec (`fedvlm.spec`), federation.toml (`fedvlm.coordinator.config`) and the benchmark's experiment files
(`fedvlm.study.config`) are all plain dataclasses read by `from_table`; each checks its ranges in
``__post_init__`` with `require`. Every error is a `SpecError` whose message starts with the dotted key.

Written by hand rather than with pydantic (2.14, installed here as a dependency of typer): the rules below are all
the configs need, the configs stay the plain frozen dataclasses the algorithm registry and the canonical task JSON
are built on, and importing pydantic and building a first model took 137-185 ms here against 7-10 ms for this
module, on a `fedvlm-coord status` that starts in about 370 ms.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from fedvlm.security.tokens import TokenError, parse_duration


class SpecError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the key."""


def require(ok: bool, key: str, why: str) -> None:
    """Raise ``SpecError("<key>: <why>")`` unless `ok`."""
    if not ok:
        raise SpecError(f"{key}: {why}")


class _Seconds:
    """Marks a float field as a duration (see `Duration`)."""


# Seconds. A table may give a positive number, or a string such as "90s", "10m", "24h", "7d"
# (`fedvlm.security.tokens.parse_duration`, the one duration syntax, also used by `fedvlm-coord enroll --ttl`).
Duration = Annotated[float, _Seconds]

# A field whose table is read by its own function: dataclasses.field(metadata={PARSE: fn}), fn(value, key) -> value.
PARSE = "fedvlm.parse"


def from_table(cls: type, raw: Any, where: str) -> Any:
    """An instance of the dataclass `cls` from the table `raw` found at dotted key `where` ("" = the top).

    Every key must be a field (unknown keys are errors, not silently ignored); missing fields take their
    defaults. Values are checked against the field's annotation: bool, int, float (an integer is accepted),
    str, ``tuple[X, ...]`` (a list of X, or one X), `Duration`, and a nested dataclass (a sub-table, read
    recursively); a field with `PARSE` metadata is read by that function. Then ``cls.__post_init__`` checks
    ranges. Raises `SpecError` naming the key.
    """
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where or 'config'}: expected a table, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            raise SpecError(f"{dotted}: unknown key (known: {', '.join(sorted(fields))})")
        parse = fields[key].metadata.get(PARSE)
        values[key] = parse(value, dotted) if parse else _value(hints[key], value, dotted)
    return cls(**values)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _value(kind: Any, value: Any, key: str) -> Any:
    if typing.get_origin(kind) is Annotated:
        return _duration(value, key)
    if dataclasses.is_dataclass(kind):
        return from_table(kind, value, key)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        items = value if isinstance(value, list | tuple) else [value]
        if not all(_is(item, v) for v in items):
            raise SpecError(f"{key}: expected a list of {item.__name__}")
        return tuple(_scalar(item, v) for v in items)
    if not _is(kind, value):
        raise SpecError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return _scalar(kind, value)


def _is(kind: type, value: Any) -> bool:
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (bool, str):
        return isinstance(value, kind)
    raise TypeError(f"config fields of type {kind!r} are not supported")


def _scalar(kind: type, value: Any) -> Any:
    return float(value) if kind is float else value


def _duration(value: Any, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        require(value > 0, key, "must be > 0")
        return float(value)
    if isinstance(value, str):
        try:
            return float(parse_duration(value))
        except TokenError as exc:
            raise SpecError(f"{key}: {exc}") from exc
    raise SpecError(f"{key}: expected a duration like \"90s\", \"10m\" or a number of seconds")

