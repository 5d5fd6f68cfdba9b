"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").

The new global is the example-weighted mean of the sites' adapters: w = sum_k n_k w_k / sum_k n_k. It is computed
by streaming: updates are consumed one at a time and one tensor at a time, so memory is one accumulator the size of
the model, whatever the number of sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Algorithm
from .config import AlgorithmConfig
from .registry import register

TensorStream = Iterator[tuple[str, torch.Tensor]]


def fedavg(updates: Iterable[tuple[int, TensorStream]]) -> dict[str, torch.Tensor]:
    """Example-weighted mean of `updates` ((num_examples, stream of (name, tensor)) pairs).

    Accumulates in float64 and returns tensors in each name's original dtype. Raises ValueError when there is
    no update, a weight is not positive, or the updates disagree on names or shapes.
    """
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    total = 0
    for index, (num_examples, stream) in enumerate(updates):
        if num_examples <= 0:
            raise ValueError(f"update {index}: num_examples must be positive, got {num_examples}")
        seen = set()
        for name, tensor in stream:
            seen.add(name)
            if index == 0:
                sums[name] = tensor.to(torch.float64) * num_examples
                dtypes[name] = tensor.dtype
                continue
            if name not in sums:
                raise ValueError(f"update {index}: unexpected tensor {name!r}")
            if sums[name].shape != tensor.shape:
                raise ValueError(f"update {index}: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(sums[name].shape)}")
            sums[name].add_(tensor.to(torch.float64), alpha=num_examples)
        if seen != set(sums):
            raise ValueError(f"update {index}: missing tensors {sorted(set(sums) - seen)[:3]}")
        total += num_examples
    if total == 0:
        raise ValueError("fedavg needs at least one update")
    return {name: (acc / total).to(dtypes[name]) for name, acc in sums.items()}


@dataclass(frozen=True)
class FedAvgConfig(AlgorithmConfig):
    """FedAvg has no keys of its own (the shared ones of AlgorithmConfig apply)."""

    name: ClassVar[str] = "fedavg"
    supports_lora_exact: ClassVar[bool] = True


class FedAvg(Algorithm):
    """FedAvg: x' = x + mean_k(d_k) = sum_k n_k y_k / sum_k n_k. No state, no client hook, nothing extra sent."""


register(FedAvgConfig, FedAvg)
