"""The task spec: what every site trains, agreed by the coordinator and all clients.

The coordinator reads it from the ``[task]`` part of ``federation.toml`` and hands it, as JSON, to every
client with each assignment, so a site never needs a copy of the federation config. It is validated once,
here, with errors that name the bad key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class SpecError(ValueError):
    """A config value is missing, of the wrong type or out of range; the message names the key."""


STRATEGIES = ("F-C", "F-L", "F-CL", "F-2stage")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA on the language model (never on the vision tower)."""

    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    # Module-name suffixes inside the language model; "all-linear" means every linear layer but the head.
    targets: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        _require(self.r >= 1, "task.lora.r", "must be >= 1")
        _require(self.alpha >= 1, "task.lora.alpha", "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "task.lora.dropout", "must be in [0, 1)")
        _require(len(self.targets) > 0, "task.lora.targets", "must name at least one module")


@dataclass(frozen=True)
class TrainSpec:
    """Local training hyper-parameters of one round on one site."""

    local_epochs: float = 1.0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int = 0  # 0 = no cap; otherwise stop a round after this many optimizer steps
    eval_batch_size: int = 32
    max_new_tokens: int = 4

    def __post_init__(self) -> None:
        _require(self.local_epochs > 0, "task.train.local_epochs", "must be > 0")
        _require(self.batch_size >= 1, "task.train.batch_size", "must be >= 1")
        _require(self.lr > 0, "task.train.lr", "must be > 0")
        _require(self.weight_decay >= 0, "task.train.weight_decay", "must be >= 0")
        _require(self.max_steps >= 0, "task.train.max_steps", "must be >= 0")
        _require(self.eval_batch_size >= 1, "task.train.eval_batch_size", "must be >= 1")
        _require(self.max_new_tokens >= 1, "task.train.max_new_tokens", "must be >= 1")


@dataclass(frozen=True)
class TaskSpec:
    """Model, strategy, task type and training recipe of a run."""

    model: str = "tiny-llava"  # a built-in preset name, or "hf:<hub id or local path>"
    strategy: str = "F-CL"
    task_type: str = "classification"
    seed: int = 0
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and self.model != "", "task.model", "must be a preset or hf:<id>")
        _require(self.strategy in STRATEGIES, "task.strategy", f"must be one of {', '.join(STRATEGIES)}")
        _require(isinstance(self.seed, int), "task.seed", "must be an integer")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal specs give equal bytes."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TaskSpec:
        """Build and validate from a TOML/JSON table; unknown keys are errors, not silently ignored."""
        raw = dict(raw)
        lora = _sub(LoraSpec, raw.pop("lora", {}), "task.lora")
        train = _sub(TrainSpec, raw.pop("train", {}), "task.train")
        top = _sub(cls, raw, "task", lora=lora, train=train)
        return top


def _sub(kind: type, raw: Any, where: str, **fixed: Any) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a table, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(kind)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known or key in fixed:
            raise SpecError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        default = known[key].default
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise SpecError(f"{where}.{key}: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, bool) or default is dataclasses.MISSING:
            pass
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif default is not None and not isinstance(value, type(default)):
            raise SpecError(f"{where}.{key}: expected {type(default).__name__}, got {type(value).__name__}")
        values[key] = value
    try:
        return kind(**values, **fixed)
    except SpecError:
        raise
    except TypeError as exc:  # pragma: no cover - guarded by the key check above
        raise SpecError(f"{where}: {exc}") from exc


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise SpecError(f"{key}: {why}")
