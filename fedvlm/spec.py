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

from fedvlm.algorithms import AlgorithmConfig, config_from_table, default_config
from fedvlm.tables import PARSE, from_table
from fedvlm.tables import SpecError as SpecError  # the error of every config, imported from here by its users
from fedvlm.tables import require as _require

STRATEGIES = ("F-C", "F-L", "F-CL", "F-2stage")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
QUANTIZATIONS = ("none", "nf4", "int8")


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
    """Local training hyper-parameters of one round on one site, and the site-GPU recipe (docs/models.md).

    An optimizer step sums the gradients of ``batch_size * grad_accum_steps`` examples (the effective batch), with
    the loss a mean over every answer token of them, so accumulation equals one big batch; ``batch_size`` is what
    one forward pass of one process holds (the memory knob). A site training with ``fedvlm-client --nproc N``
    splits each effective batch over its N processes, so the run trains the same steps whatever a site's hardware.
    """

    local_epochs: float = 1.0
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int = 0  # 0 = no cap; otherwise stop a round after this many optimizer steps
    eval_batch_size: int = 32
    max_new_tokens: int = 4
    # fp32 | bf16 | fp16: autocast dtype of forward passes; bf16/fp16 also hold the frozen base in that dtype.
    # The adapter always trains and travels in float32; fp16 uses a loss scaler and needs a CUDA GPU.
    precision: str = "fp32"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 1/3 more compute
    grad_accum_steps: int = 1
    # constant | cosine: cosine decays lr to 0 over the whole run (all rounds' local steps), as in FedVLMBench.
    lr_schedule: str = "constant"
    warmup_steps: int = 0  # linear warm-up over the run's first local steps (either schedule)

    def __post_init__(self) -> None:
        _require(self.local_epochs > 0, "task.train.local_epochs", "must be > 0")
        _require(self.batch_size >= 1, "task.train.batch_size", "must be >= 1")
        _require(self.lr > 0, "task.train.lr", "must be > 0")
        _require(self.weight_decay >= 0, "task.train.weight_decay", "must be >= 0")
        _require(self.max_steps >= 0, "task.train.max_steps", "must be >= 0")
        _require(self.eval_batch_size >= 1, "task.train.eval_batch_size", "must be >= 1")
        _require(self.max_new_tokens >= 1, "task.train.max_new_tokens", "must be >= 1")
        _require(self.precision in PRECISIONS, "task.train.precision", f"must be one of {', '.join(PRECISIONS)}")
        _require(isinstance(self.gradient_checkpointing, bool), "task.train.gradient_checkpointing",
                 "must be true or false")
        _require(_is_int(self.grad_accum_steps) and self.grad_accum_steps >= 1, "task.train.grad_accum_steps",
                 "must be an integer >= 1")
        _require(self.lr_schedule in LR_SCHEDULES, "task.train.lr_schedule",
                 f"must be one of {', '.join(LR_SCHEDULES)}")
        _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "task.train.warmup_steps",
                 "must be an integer >= 0")


@dataclass(frozen=True)
class TaskSpec:
    """Model, strategy, task type and training recipe of a run."""

    model: str = "tiny-llava"  # a built-in preset name, or "hf:<hub id or local path>"
    strategy: str = "F-CL"
    # F-2stage only: rounds 1..switch_round-1 train the connector, rounds >= switch_round the LM LoRA (0 = unset).
    switch_round: int = 0
    task_type: str = "classification"  # classification | vqa | captioning | grounding | multitask (docs/data.md)
    # Grounding answers: "xyxy-pixel" = [x_min, y_min, x_max, y_max] in image pixels, top-left origin, max exclusive;
    # "xyxy-1000" = the same scaled to integers in [0, 1000] per axis (fedvlm.tasks.grounding).
    box_format: str = "xyxy-pixel"
    seed: int = 0
    # none | nf4 | int8: QLoRA, the frozen base quantized by bitsandbytes at load (pip install 'fedvlm[qlora]');
    # LoRA and the connector stay float32, so the update is the same as without and mixed sites can join one run.
    quantization: str = "none"
    lora: LoraSpec = field(default_factory=LoraSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    # [task.algorithm]: the config class of the algorithm its `name` selects (fedvlm.algorithms, docs/algorithms.md).
    algorithm: AlgorithmConfig = field(default_factory=default_config, metadata={PARSE: config_from_table})

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and self.model != "", "task.model", "must be a preset or hf:<id>")
        _require(self.strategy in STRATEGIES, "task.strategy", f"must be one of {', '.join(STRATEGIES)}")
        _require(isinstance(self.switch_round, int) and not isinstance(self.switch_round, bool),
                 "task.switch_round", "must be an integer")
        if self.strategy == "F-2stage":
            _require(self.switch_round >= 2, "task.switch_round",
                     "F-2stage needs switch_round >= 2 (rounds before it train the connector, from it on the LoRA)")
        else:
            _require(self.switch_round == 0, "task.switch_round", "only used by strategy F-2stage (leave it unset)")
        from fedvlm.tasks import TASK_TYPES
        from fedvlm.tasks.grounding import BOX_FORMATS

        _require(self.task_type in TASK_TYPES, "task.task_type", f"must be one of {', '.join(TASK_TYPES)}")
        _require(self.box_format in BOX_FORMATS, "task.box_format", f"must be one of {', '.join(BOX_FORMATS)}")
        _require(isinstance(self.seed, int), "task.seed", "must be an integer")
        _require(self.quantization in QUANTIZATIONS, "task.quantization",
                 f"must be one of {', '.join(QUANTIZATIONS)}")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal specs give equal bytes; `from_json` reads it back."""
        raw = dataclasses.asdict(self)
        raw["algorithm"] = self.algorithm.to_dict()
        return json.dumps(raw, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TaskSpec:
        """Build and validate from a TOML/JSON table; unknown keys are errors, not silently ignored."""
        return from_table(cls, raw, "task")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
