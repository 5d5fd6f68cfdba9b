"""Federated optimisation algorithms: one module per algorithm, pure tensor math, no I/O and no gRPC.

An algorithm is looked up by ``task.algorithm.name``. The lookups below import every module of this package once
(each algorithm module registers itself, registry.py), so a new algorithm is one new file and nothing lists the
names; importing the package itself needs no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedvlm.tables import SpecError, from_table, require

from .config import AlgorithmConfig
from .registry import REGISTRY, Registration

if TYPE_CHECKING:
    from .base import Algorithm

DEFAULT = "fedavg"


@functools.cache
def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def registered() -> Mapping[str, Registration]:
    """Every algorithm of the package, by name."""
    _import_all()
    return REGISTRY


def build(config: AlgorithmConfig) -> Algorithm:
    """The algorithm `config` configures."""
    return registered()[config.name].algorithm(config)


def algorithm_config(name: str = DEFAULT, **options: Any) -> AlgorithmConfig:
    """The config of algorithm `name` with `options` (keys of [task.algorithm]), as `config_from_table` reads it."""
    return config_from_table({"name": name, **options})


def default_config() -> AlgorithmConfig:
    """The config of the default algorithm (fedavg) with every key at its default."""
    return config_from_table({})


def config_from_table(raw: Any, where: str = "task.algorithm") -> AlgorithmConfig:
    """The config of the algorithm that ``raw["name"]`` names (default fedavg), from a [task.algorithm] table.

    A key of another algorithm is checked as that algorithm checks it and then ignored (a sweep over
    task.algorithm.name shares one table, e.g. bench suite 2 sets FedAdam's eta); a key no algorithm has is an
    error. Raises `SpecError` naming the key.
    """
    if not isinstance(raw, Mapping):
        raise SpecError(f"{where}: expected a table, got {type(raw).__name__}")
    algorithms = registered()
    table = dict(raw)
    name = table.pop("name", DEFAULT)
    require(isinstance(name, str) and name in algorithms, f"{where}.name",
            f"must be one of {', '.join(sorted(algorithms))}")
    owners: dict[str, type[AlgorithmConfig]] = {}  # key -> the config that checks it (its own first)
    for config in [algorithms[name].config, *(algorithms[n].config for n in sorted(algorithms))]:
        for field in dataclasses.fields(config):
            owners.setdefault(field.name, config)
    for key in table:
        require(key in owners, f"{where}.{key}", f"unknown key (known: {', '.join(sorted({'name', *owners}))})")
    chosen = algorithms[name].config
    for other in sorted({owners[key] for key in table} - {chosen}, key=lambda config: config.name):
        from_table(other, {k: v for k, v in table.items() if owners[k] is other}, where)
    return from_table(chosen, {k: v for k, v in table.items() if owners[k] is chosen}, where)
