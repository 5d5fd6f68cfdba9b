"""The [task.algorithm] keys every algorithm shares: how the sites' deltas of a round become one (aggregation.py).

An algorithm's own config subclasses `AlgorithmConfig` in the algorithm's module, adds its hyper-parameters and
checks them in ``__post_init__`` (docs/algorithms.md, "Adding an algorithm"). Importing this module needs no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from fedvlm.tables import require

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Options of the round's combination step, the same for every algorithm (robust aggregators, clipping,
    central DP, exact LoRA aggregation); validated once, errors naming ``task.algorithm.<key>``."""

    name: ClassVar[str] = ""  # the task.algorithm.name that selects the subclass
    # Whether the server step may run on re-factorised LoRA products (lora_exact): true for a plain x + d step
    # without state, false where moments or control variates live in the coordinates of the factors.
    supports_lora_exact: ClassVar[bool] = False
    # Whether the server step needs only the weighted sum of the adapters' deltas (secure aggregation hides the rest).
    supports_secure_aggregation: ClassVar[bool] = True

    aggregator: str = "mean"  # mean | median | trimmed_mean | krum
    trim_ratio: float = 0.2  # trimmed_mean: fraction cut at each end per coordinate
    krum_byzantine: int = 1  # krum: f, the number of faulty sites tolerated
    krum_select: int = 1  # krum: m, how many best-scored updates are averaged (1 = Krum, >1 = multi-Krum)
    clip_norm: float = 0.0  # > 0: every site's delta is clipped to this L2 norm first
    dp_noise_multiplier: float = 0.0  # > 0: central Gaussian noise (needs clip_norm and the mean aggregator)
    dp_delta: float = 1e-5
    lora_exact: bool = False  # aggregate LoRA products B·A and re-factorise to rank r (SVD)
    secure_aggregation: bool = False  # the coordinator learns only the sum of the sites' updates (Bonawitz et al.)
    secagg_threshold: int = 0  # sites that must stay to unmask (more than half of the sampled); 0 = half + 1

    def __post_init__(self) -> None:
        require(self.aggregator in AGGREGATORS, "task.algorithm.aggregator", f"must be one of {', '.join(AGGREGATORS)}")
        require(0 <= self.trim_ratio < 0.5, "task.algorithm.trim_ratio", "must be in [0, 0.5)")
        require(self.krum_byzantine >= 0, "task.algorithm.krum_byzantine", "must be >= 0")
        require(self.krum_select >= 1, "task.algorithm.krum_select", "must be >= 1")
        require(self.clip_norm >= 0, "task.algorithm.clip_norm", "must be >= 0")
        require(self.dp_noise_multiplier >= 0, "task.algorithm.dp_noise_multiplier", "must be >= 0")
        require(0 < self.dp_delta < 1, "task.algorithm.dp_delta", "must be in (0, 1)")
        if self.dp_noise_multiplier > 0:
            require(self.clip_norm > 0, "task.algorithm.clip_norm", "must be > 0 when dp_noise_multiplier is set")
            require(self.aggregator == "mean", "task.algorithm.aggregator",
                    "must be mean when dp_noise_multiplier is set")
        if self.lora_exact:
            require(self.supports_lora_exact, "task.algorithm.lora_exact",
                    f"not supported by {self.name}: its server step works in the coordinates of the LoRA factors")
            require(self.aggregator == "mean", "task.algorithm.lora_exact", "needs the mean aggregator")
        require(self.secagg_threshold >= 0, "task.algorithm.secagg_threshold", "must be >= 0 (0: half the sampled + 1)")
        if self.secure_aggregation:
            from .secure_sum import check_secure_aggregation

            check_secure_aggregation(self)

    def to_dict(self) -> dict[str, Any]:
        """The [task.algorithm] table of this config: ``name`` and every field."""
        return {"name": self.name, **dataclasses.asdict(self)}
