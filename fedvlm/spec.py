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


ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadagrad", "fedyogi", "fedadam")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class AlgorithmSpec:
    """The federated optimisation algorithm and its server-side aggregation (docs/algorithms.md).

    Hyper-parameters of algorithms other than ``name`` are ignored. ``aggregator`` replaces the weighted mean of
    the sites' deltas; ``clip_norm`` > 0 clips every site's delta to that L2 norm first; ``dp_noise_multiplier``
    > 0 adds central Gaussian noise (needs ``clip_norm`` and the mean aggregator).
    """

    name: str = "fedavg"
    aggregator: str = "mean"
    mu: float = 0.01  # FedProx proximal weight
    server_lr: float = 1.0  # FedAvgM, SCAFFOLD: global step size
    server_momentum: float = 0.9  # FedAvgM
    scaffold_clients: int = 0  # SCAFFOLD N (all sites of the federation); 0 = the sites of each round
    eta: float = 1e-3  # FedAdagrad / FedYogi / FedAdam server learning rate
    tau: float = 1e-3  # adaptivity (epsilon) of the adaptive server optimizers
    beta1: float = 0.9
    beta2: float = 0.99
    trim_ratio: float = 0.2  # trimmed_mean: fraction cut at each end per coordinate
    krum_byzantine: int = 1  # krum: f, the number of faulty sites tolerated
    krum_select: int = 1  # krum: m, how many best-scored updates are averaged (1 = Krum, >1 = multi-Krum)
    clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5
    lora_exact: bool = False  # aggregate LoRA products B·A and re-factorise to rank r (SVD)

    def __post_init__(self) -> None:
        _require(isinstance(self.lora_exact, bool), "task.algorithm.lora_exact", "must be true or false")
        _require(self.name in ALGORITHMS, "task.algorithm.name", f"must be one of {', '.join(ALGORITHMS)}")
        _require(self.aggregator in AGGREGATORS, "task.algorithm.aggregator",
                 f"must be one of {', '.join(AGGREGATORS)}")
        _require(self.mu >= 0, "task.algorithm.mu", "must be >= 0")
        _require(self.server_lr > 0, "task.algorithm.server_lr", "must be > 0")
        _require(0 <= self.server_momentum < 1, "task.algorithm.server_momentum", "must be in [0, 1)")
        _require(self.scaffold_clients >= 0, "task.algorithm.scaffold_clients", "must be >= 0")
        _require(self.eta > 0, "task.algorithm.eta", "must be > 0")
        _require(self.tau > 0, "task.algorithm.tau", "must be > 0")
        _require(0 <= self.beta1 < 1, "task.algorithm.beta1", "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "task.algorithm.beta2", "must be in [0, 1)")
        _require(0 <= self.trim_ratio < 0.5, "task.algorithm.trim_ratio", "must be in [0, 0.5)")
        _require(self.krum_byzantine >= 0, "task.algorithm.krum_byzantine", "must be >= 0")
        _require(self.krum_select >= 1, "task.algorithm.krum_select", "must be >= 1")
        _require(self.clip_norm >= 0, "task.algorithm.clip_norm", "must be >= 0")
        _require(self.dp_noise_multiplier >= 0, "task.algorithm.dp_noise_multiplier", "must be >= 0")
        _require(0 < self.dp_delta < 1, "task.algorithm.dp_delta", "must be in (0, 1)")
        if self.dp_noise_multiplier > 0:
            _require(self.clip_norm > 0, "task.algorithm.clip_norm", "must be > 0 when dp_noise_multiplier is set")
            _require(self.aggregator == "mean", "task.algorithm.aggregator",
                     "must be mean when dp_noise_multiplier is set")
        if self.lora_exact:
            _require(self.name in ("fedavg", "fedprox") and self.aggregator == "mean",
                     "task.algorithm.lora_exact", "needs name fedavg or fedprox and the mean aggregator")


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
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)

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
        algorithm = _sub(AlgorithmSpec, raw.pop("algorithm", {}), "task.algorithm")
        top = _sub(cls, raw, "task", lora=lora, train=train, algorithm=algorithm)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise SpecError(f"{key}: {why}")
