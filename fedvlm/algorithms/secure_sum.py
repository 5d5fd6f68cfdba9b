"""What secure aggregation (fedvlm.security.secagg) changes in a round's math: the site sends its weighted delta, the
coordinator gets back only the sum over the sites and hands the algorithm the mean.

- On a site: d = y - x over the adapter tensors it sends, clipped to ``clip_norm`` there (the coordinator cannot
  clip what it cannot see), times its weight: its example count n_k, or 1 under central DP (DP-FedAvg's equal
  weights). The example count also travels in the clear, in the signed manifest, as in every round.
- On the coordinator: the unmasked sum S = sum_k w_k d_k over the surviving sites and W = sum_k w_k give the mean
  M = S / W. The algorithm's server step (its ``aggregate``, unchanged) receives one update per survivor, each equal
  to x + M with the survivor's weight: every mean-based combination of K copies of M is M, so FedAvg, FedProx,
  FedAvgM and the FedAdam family take the step they would take on the plain updates, and central DP adds its noise
  (scaled by K) to M after unmasking.

Only algorithms whose server step needs nothing but that mean can run this way (``check_secure_aggregation``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fedvlm.tables import require

from .config import AlgorithmConfig

if TYPE_CHECKING:  # torch is imported where tensors are made: the config checks and read-only commands need none
    import torch

    from .base import ClientUpdate


def check_secure_aggregation(config: AlgorithmConfig) -> None:
    """``SpecError`` naming ``task.algorithm.secure_aggregation`` when the config needs more than the sum."""
    key = "task.algorithm.secure_aggregation"
    require(config.aggregator == "mean", key,
            f"needs the mean aggregator: {config.aggregator} needs each site's update, the coordinator sees only "
            "their sum")
    require(config.lora_aggregation == "factors", key,
            f"not with lora_aggregation = \"{config.lora_aggregation}\": exact and flora combine each site's product "
            "B·A, which the sum of masked factors does not give; ffa and rolora send one factor per round, which the "
            "masking does not cover yet")
    require(config.supports_secure_aggregation, key,
            f"not supported by {config.name}: its server step needs more than the sum of the updates")


def threshold(config: AlgorithmConfig, sampled: int) -> int:
    """Sites that must stay to unmask a round of ``sampled`` sites: the configured one, or a majority."""
    return config.secagg_threshold or sampled // 2 + 1


def site_weight(config: AlgorithmConfig, num_examples: int) -> float:
    """The factor a site multiplies its delta by before encoding (the weight of the plain weighted mean)."""
    return 1.0 if config.dp_noise_multiplier > 0 else float(num_examples)


def site_delta(config: AlgorithmConfig, base: Mapping[str, torch.Tensor],
               update: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The site's delta ``update - base`` in float64, clipped to ``clip_norm`` (unweighted)."""
    delta = {n: (t.double() - base[n].double()).numpy() for n, t in update.items()}
    if config.clip_norm > 0:
        norm = math.sqrt(sum(float(np.square(d).sum()) for d in delta.values()))
        if norm > config.clip_norm:
            delta = {n: d * (config.clip_norm / norm) for n, d in delta.items()}
    return delta


def updates_from_sum(base: Mapping[str, torch.Tensor], summed: Mapping[str, np.ndarray],
                     weights: Sequence[float]) -> list[ClientUpdate]:
    """One update per survivor (its weight), each the base plus the mean delta ``summed / sum(weights)``."""
    import torch

    from .base import ClientUpdate

    total = float(sum(weights))
    mean = {n: torch.from_numpy(np.asarray(v, dtype=np.float64) / total) for n, v in summed.items()}

    def load() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {n: base[n].double() + m for n, m in mean.items()}, {}

    return [ClientUpdate(w, load) for w in weights]
