"""The experiment config of ``fedvlm bench``: a ``[task]`` table exactly as in ``federation.toml`` plus an
``[experiment]`` table (dataset, partition, clients, rounds, seeds, baseline); a sweep file adds ``[grid]``.

Validated once, here, with errors that name the bad key (``SpecError``, as the task spec).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedvlm.spec import SpecError, TaskSpec
from fedvlm.tables import from_table
from fedvlm.tables import require as _require

BASELINES = ("federated", "centralized", "local")
PARTITIONS = ("iid", "dirichlet", "quantity", "task", "sites")
BUILTIN_DATASETS = ("digits", "vqa", "captioning", "grounding", "multitask")


@dataclass(frozen=True)
class ExperimentSpec:
    """How the in-process study is run (docs/benchmark.md)."""

    name: str = "experiment"
    # A built-in dataset (fedvlm.data.builtin) or a directory: with train.json (+ test.json) to partition, or with
    # site_<i>/ folders for partition "sites".
    dataset: str = "digits"
    # "iid", "dirichlet:<alpha>", "quantity:<alpha>", "task" (one task per client), "sites" (the dataset's own
    # site_<i> folders, unchanged).
    partition: str = "iid"
    partition_key: str = "answer"  # the record field label-skew partitions split on ("answer": the gpt answer)
    num_clients: int = 3
    clients_per_round: int = 0  # 0 = all clients every round
    rounds: int = 2
    seeds: tuple[int, ...] = (0,)
    baseline: str = "federated"  # federated | centralized (one model on the union) | local (each client alone)
    train_size: int = 0  # built-in datasets: records per task in the pooled train split (0 = the dataset's default)
    test_size: int = 0  # built-in datasets: records per task in the evaluation split (0 = the dataset's default)
    eval_every: int = 1  # evaluate the global every this many rounds (the last round always)
    metric: str = ""  # the headline metric of the report ("" = accuracy, cider or miou, whichever the task gives)
    target: float = 0.0  # report: rounds, simulated seconds and bytes until the headline metric first reaches it
    # Stragglers under a round deadline, on a simulated clock: a client's round takes steps x step_seconds, times
    # straggler_slowdown for the `stragglers` fraction of clients (drawn per seed). With round_deadline > 0, an
    # update later than the deadline is refused (as the coordinator does) and the round lasts the deadline; fewer
    # than `quorum` updates in time: the round is lost (the global stays).
    stragglers: float = 0.0
    straggler_slowdown: float = 4.0
    step_seconds: float = 0.1
    round_deadline: float = 0.0  # simulated seconds; 0 = every sampled client is waited for
    quorum: int = 1
    # The LoRA rank each site can afford (cycled over the sites, a site's --lora-rank). Under a lora_aggregation
    # that allows site-local ranks (exact, flora) every site trains its own; the others need one rank, so every
    # site trains the smallest, as a federation of these sites would have to (BenchConfig.for_seed). () = task.lora.r.
    site_lora_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(isinstance(self.name, str) and re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name) is not None,
                 "experiment.name", "must be a non-empty name of letters, digits and _.+-")
        _require(isinstance(self.dataset, str) and self.dataset != "", "experiment.dataset",
                 f"must be one of {', '.join(BUILTIN_DATASETS)} or a directory")
        method, alpha = parse_partition(self.partition)
        _require(self.num_clients >= 1, "experiment.num_clients", "must be >= 1")
        _require(0 <= self.clients_per_round <= self.num_clients, "experiment.clients_per_round",
                 "must be in [0, num_clients] (0 = all)")
        _require(self.rounds >= 1, "experiment.rounds", "must be >= 1")
        _require(len(self.seeds) >= 1 and all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds),
                 "experiment.seeds", "must be a non-empty list of integers")
        _require(len(set(self.seeds)) == len(self.seeds), "experiment.seeds", "must not repeat a seed")
        _require(self.baseline in BASELINES, "experiment.baseline", f"must be one of {', '.join(BASELINES)}")
        _require(self.train_size >= 0, "experiment.train_size", "must be >= 0")
        _require(self.test_size >= 0, "experiment.test_size", "must be >= 0")
        _require(self.eval_every >= 1, "experiment.eval_every", "must be >= 1")
        _require(0.0 <= self.stragglers <= 1.0, "experiment.stragglers", "must be a fraction in [0, 1]")
        _require(self.straggler_slowdown >= 1.0, "experiment.straggler_slowdown", "must be >= 1")
        _require(self.step_seconds > 0, "experiment.step_seconds", "must be > 0")
        _require(self.round_deadline >= 0, "experiment.round_deadline", "must be >= 0 (0 = no deadline)")
        _require(1 <= self.quorum <= self.sampled_per_round, "experiment.quorum",
                 "must be between 1 and the clients sampled per round")
        _require(all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.site_lora_ranks),
                 "experiment.site_lora_ranks", "must be a list of positive integers")
        if method == "sites":
            _require(self.dataset not in BUILTIN_DATASETS, "experiment.partition",
                     "\"sites\" needs experiment.dataset to be a directory with site_<i> folders")

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients


def parse_partition(value: Any) -> tuple[str, float]:
    """``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``; ``SpecError`` naming ``experiment.partition`` otherwise."""
    if not isinstance(value, str):
        raise SpecError("experiment.partition: expected str")
    method, _, rest = value.partition(":")
    if method not in PARTITIONS:
        raise SpecError(f"experiment.partition: must be one of iid, dirichlet:<alpha>, quantity:<alpha>, task, sites "
                        f"(got {value!r})")
    if method in ("dirichlet", "quantity"):
        try:
            alpha = float(rest)
        except ValueError:
            raise SpecError(f"experiment.partition: {method} needs an alpha, e.g. \"{method}:0.5\" "
                            f"(got {value!r})") from None
        _require(alpha > 0, "experiment.partition", "alpha must be > 0")
        return method, alpha
    _require(rest == "", "experiment.partition", f"{method} takes no parameter (got {value!r})")
    return method, 0.0


@dataclass(frozen=True)
class BenchConfig:
    """One experiment: what to train (``task``) and how the study runs it (``experiment``)."""

    task: TaskSpec = field(default_factory=TaskSpec)
    experiment: ExperimentSpec = field(default_factory=ExperimentSpec)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchConfig:
        """Parse and validate an experiment table; raises SpecError naming the key."""
        return from_table(cls, raw, "")

    def to_dict(self) -> dict[str, Any]:
        return {"task": json.loads(self.task.to_json()), "experiment": dataclasses.asdict(self.experiment)}

    def for_seed(self, seed: int) -> TaskSpec:
        """The task spec of one trial: the model's initial adapter, dropout and shuffles follow ``seed``; with
        ``site_lora_ranks`` under a lora_aggregation that needs equal ranks, the LoRA rank is their smallest."""
        task = dataclasses.replace(self.task, seed=seed)
        if self.experiment.site_lora_ranks and not task.algorithm.heterogeneous_ranks:
            smallest = min(self.experiment.site_lora_ranks)
            alpha = max(1, round(task.lora.alpha * smallest / task.lora.r))  # as for a site rank: alpha / r is kept
            task = dataclasses.replace(task, lora=dataclasses.replace(task.lora, r=smallest, alpha=alpha))
        return task

    def site_ranks(self, names: list[str]) -> dict[str, int]:
        """Each site's LoRA rank in a trial (``site_lora_ranks`` cycled; the spec's rank where ranks must match)."""
        rank = self.for_seed(0).lora.r
        if not self.experiment.site_lora_ranks or not self.task.algorithm.heterogeneous_ranks:
            return {name: rank for name in names}
        ranks = self.experiment.site_lora_ranks
        return {name: ranks[i % len(ranks)] for i, name in enumerate(names)}


@dataclass(frozen=True)
class Variant:
    """One point of a sweep grid: its name (the varied values) and its config."""

    name: str
    values: dict[str, Any]
    config: BenchConfig


def load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc


def load_config(path: Path) -> BenchConfig:
    """An experiment file (``[task]`` + ``[experiment]``); a file with ``[grid]`` is a sweep (``load_grid``)."""
    raw = load_toml(path)
    if "grid" in raw:
        raise SpecError("grid: this is a sweep file: run it with `fedvlm bench sweep`")
    return BenchConfig.from_dict(raw)


def load_grid(path: Path) -> list[Variant]:
    """A sweep file: a base experiment plus ``[grid]``, dotted keys (``"task.algorithm.name"``,
    ``"experiment.partition"``) each mapped to a list of values; the variants are their cartesian product."""
    return expand_grid(load_toml(path))


# Grid keys a baseline does not depend on: baselines never aggregate (no algorithm), and the centralized model
# trains on the union of the clients' data, whatever the split.
_NOT_FOR_BASELINES = ("task.algorithm", "experiment.stragglers", "experiment.straggler_slowdown",
                      "experiment.step_seconds", "experiment.round_deadline", "experiment.quorum")
_NOT_FOR_CENTRALIZED = ("experiment.partition", "experiment.partition_key", "experiment.num_clients",
                        "experiment.clients_per_round")


def expand_grid(raw: dict[str, Any]) -> list[Variant]:
    """The variants of a sweep: the cartesian product of ``[grid]``, then, for each name in the top-level
    ``baselines`` list ("centralized", "local"), the same product over the axes that baseline depends on."""
    raw = copy.deepcopy(raw)
    grid = _table(raw.pop("grid", {}), "grid")
    baselines = raw.pop("baselines", [])
    if not isinstance(baselines, list) or any(b not in BASELINES[1:] for b in baselines) \
            or len(set(baselines)) != len(baselines):
        raise SpecError(f"baselines: expected a list of distinct names from {', '.join(BASELINES[1:])}")
    if baselines and "experiment.baseline" in grid:
        raise SpecError("baselines: cannot be combined with a grid over experiment.baseline")
    base = BenchConfig.from_dict(raw)  # the base alone must be valid: its errors name the key without a grid prefix
    if baselines and base.experiment.baseline != "federated":
        raise SpecError("baselines: the base experiment must be federated (experiment.baseline)")
    axes: list[tuple[str, list[Any]]] = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"grid.{key}: expected a non-empty list of values")
        parts = key.split(".")
        if parts[0] not in ("task", "experiment") or len(parts) < 2:
            raise SpecError(f"grid.{key}: keys are dotted paths under task or experiment, e.g. task.algorithm.name")
        if key in ("experiment.seeds", "experiment.name"):
            raise SpecError(f"grid.{key}: cannot be swept (seeds are listed in experiment.seeds)")
        axes.append((key, values))
    variants = _product(raw, axes, {})
    for baseline in baselines:
        skip = _NOT_FOR_BASELINES + (_NOT_FOR_CENTRALIZED if baseline == "centralized" else ())
        kept = [(k, v) for k, v in axes if not k.startswith(skip)]
        variants += _product(raw, kept, {"experiment.baseline": baseline})
    names = [v.name for v in variants]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise SpecError(f"grid: two variants share the name {duplicate!r}")
    return variants


def _product(raw: dict[str, Any], axes: list[tuple[str, list[Any]]], fixed: dict[str, Any]) -> list[Variant]:
    """One variant per combination of the axes' values, each with ``fixed`` set too (named first)."""
    variants: list[Variant] = []
    for combo in itertools.product(*(values for _, values in axes)):
        variant = copy.deepcopy(raw)
        values = {**fixed, **dict(zip([k for k, _ in axes], combo, strict=True))}
        for key, value in values.items():
            node = variant
            *path, leaf = key.split(".")
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise SpecError(f"grid.{key}: {part} is not a table")
            node[leaf] = value
        try:
            config = BenchConfig.from_dict(variant)
        except SpecError as exc:
            raise SpecError(f"grid ({_describe(values)}): {exc}") from exc
        name = _slug(values) if values else config.experiment.name
        variants.append(Variant(name, values, config))
    return variants


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _slug(values: dict[str, Any]) -> str:
    text = "__".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", text)


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a table, got {type(value).__name__}")
    return value

