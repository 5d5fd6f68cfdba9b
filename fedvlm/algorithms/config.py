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
CLIP_MODES = ("fixed", "adaptive")
# How LoRA factors become the global's (lora_aggregation.py): averaged as they are, exactly through their products
# (FlexLoRA-style SVD), FFA-LoRA (only B), RoLoRA (B and A in alternate rounds), FLoRA (stacked, merged into the base).
LORA_AGGREGATIONS = ("factors", "exact", "ffa", "rolora", "flora")
PRODUCT_AGGREGATIONS = ("exact", "flora")  # server side works on B·A products: sites may train their own ranks


@dataclass(frozen=True)
class AlgorithmConfig:
    """Options of the round's combination step, the same for every algorithm (robust aggregators, clipping,
    central DP and its budget, LoRA aggregation); validated once, errors naming ``task.algorithm.<key>``."""

    name: ClassVar[str] = ""  # the task.algorithm.name that selects the subclass
    # Whether the server step may run on LoRA products (lora_aggregation exact or flora): true for a plain x + d
    # step without state, false where moments or control variates live in the coordinates of the factors.
    supports_lora_exact: ClassVar[bool] = False
    # Whether the server step needs only the weighted sum of the adapters' deltas (secure aggregation hides the rest).
    supports_secure_aggregation: ClassVar[bool] = True

    aggregator: str = "mean"  # mean | median | trimmed_mean | krum
    trim_ratio: float = 0.2  # trimmed_mean: fraction cut at each end per coordinate
    krum_byzantine: int = 1  # krum: f, the number of faulty sites tolerated
    krum_select: int = 1  # krum: m, how many best-scored updates are averaged (1 = Krum, >1 = multi-Krum)
    clip_norm: float = 0.0  # > 0: every site's delta is clipped to this L2 norm first (adaptive: the initial norm)
    # fixed: clip_norm for every round; adaptive: the norm follows the clip_quantile of the sites' update norms
    # (Andrew et al. 2021): C <- C exp(-clip_lr (b - clip_quantile)), b the noised fraction of unclipped updates.
    clip_mode: str = "fixed"
    clip_quantile: float = 0.5  # adaptive: the target fraction of updates left unclipped
    clip_lr: float = 0.2  # adaptive: the geometric step size of the clip norm
    clip_count_stddev: float = 0.0  # adaptive: std of the Gaussian noise on the count of unclipped updates
    dp_noise_multiplier: float = 0.0  # > 0: central Gaussian noise (needs clip_norm and the mean aggregator)
    dp_delta: float = 1e-5
    dp_max_epsilon: float = 0.0  # > 0: a round whose release would spend more (at dp_delta) is not started
    lora_exact: bool = False  # the same as lora_aggregation = "exact" (kept for configs written before it)
    lora_aggregation: str = "factors"  # factors | exact | ffa | rolora | flora (lora_aggregation.py)
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
        require(self.clip_mode in CLIP_MODES, "task.algorithm.clip_mode", f"must be one of {', '.join(CLIP_MODES)}")
        require(0 < self.clip_quantile < 1, "task.algorithm.clip_quantile", "must be in (0, 1)")
        require(self.clip_lr > 0, "task.algorithm.clip_lr", "must be > 0")
        require(self.clip_count_stddev >= 0, "task.algorithm.clip_count_stddev", "must be >= 0")
        if self.clip_mode == "adaptive":
            require(self.clip_norm > 0, "task.algorithm.clip_norm", "must be > 0 (the initial norm) when clip_mode is "
                    "adaptive")
        if self.dp_noise_multiplier > 0:
            require(self.clip_norm > 0, "task.algorithm.clip_norm", "must be > 0 when dp_noise_multiplier is set")
            require(self.aggregator == "mean", "task.algorithm.aggregator",
                    "must be mean when dp_noise_multiplier is set")
            if self.clip_mode == "adaptive":  # the count's noise takes part of the budget (privacy.py)
                require(self.clip_count_stddev > self.dp_noise_multiplier / 2, "task.algorithm.clip_count_stddev",
                        f"must be > dp_noise_multiplier / 2 = {self.dp_noise_multiplier / 2:g} with DP and adaptive "
                        "clipping (Andrew et al. suggest clients_per_round / 20)")
        require(self.dp_max_epsilon >= 0, "task.algorithm.dp_max_epsilon", "must be >= 0 (0 = no budget)")
        if self.dp_max_epsilon > 0:
            require(self.dp_noise_multiplier > 0, "task.algorithm.dp_max_epsilon",
                    "needs dp_noise_multiplier > 0 (without noise no round has a finite epsilon)")
        require(self.lora_aggregation in LORA_AGGREGATIONS, "task.algorithm.lora_aggregation",
                f"must be one of {', '.join(LORA_AGGREGATIONS)}")
        key = "task.algorithm.lora_exact" if self.lora_exact else "task.algorithm.lora_aggregation"  # the one set
        if self.lora_exact:
            require(self.lora_aggregation in ("factors", "exact"), "task.algorithm.lora_exact",
                    f"lora_exact = true means lora_aggregation = \"exact\"; it contradicts \"{self.lora_aggregation}\""
                    ": drop lora_exact")
            object.__setattr__(self, "lora_aggregation", "exact")  # frozen: the one normalisation of the alias
        object.__setattr__(self, "lora_exact", self.lora_aggregation == "exact")
        if self.lora_aggregation in PRODUCT_AGGREGATIONS:
            require(self.supports_lora_exact, key, f"{self.lora_aggregation} is not supported by {self.name}: its "
                    "server step works in the coordinates of the LoRA factors")
            require(self.aggregator == "mean", key, f"{self.lora_aggregation} needs the mean aggregator")
            require(self.clip_norm == 0 and self.dp_noise_multiplier == 0, key,
                    f"{self.lora_aggregation} aggregates B·A products, which are neither clipped nor noised: "
                    "use lora_aggregation = \"ffa\" or \"rolora\" with clip_norm / dp_noise_multiplier")

        require(self.secagg_threshold >= 0, "task.algorithm.secagg_threshold", "must be >= 0 (0: half the sampled + 1)")
        if self.secure_aggregation:
            from .secure_sum import check_secure_aggregation

            check_secure_aggregation(self)

    @property
    def heterogeneous_ranks(self) -> bool:
        """Whether sites may train their own LoRA rank (`--lora-rank`): the server works on the products B·A."""
        return self.lora_aggregation in PRODUCT_AGGREGATIONS

    def to_dict(self) -> dict[str, Any]:
        """The [task.algorithm] table of this config: ``name`` and every field."""
        return {"name": self.name, **dataclasses.asdict(self)}
