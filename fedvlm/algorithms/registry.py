"""The registry from an algorithm's name to its config class and implementation (PEFT's `register_peft_method`).

Each algorithm module ends with ``register(ItsConfig, ItsAlgorithm)``; `fedvlm.algorithms` imports every module of
the package before a lookup, so nothing else lists the names. This module imports nothing of the algorithms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import AlgorithmConfig

if TYPE_CHECKING:
    from .base import Algorithm


@dataclass(frozen=True)
class Registration:
    """What one algorithm registered: its config class and its implementation."""

    config: type[AlgorithmConfig]
    algorithm: type[Algorithm]


REGISTRY: dict[str, Registration] = {}  # complete once `fedvlm.algorithms.registered()` has run


def register(config: type[AlgorithmConfig], algorithm: type[Algorithm]) -> None:
    """Make `algorithm`, configured by `config`, the algorithm of ``task.algorithm.name = config.name``."""
    if not config.name:
        raise ValueError(f"{config.__name__} has no name")
    entry = Registration(config, algorithm)
    if REGISTRY.setdefault(config.name, entry) != entry:
        raise ValueError(f"two algorithms are registered as {config.name!r}")
    REGISTRY[config.name] = entry
