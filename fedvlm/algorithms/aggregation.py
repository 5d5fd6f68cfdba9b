"""How the sites' deltas become one delta: weighted mean, robust aggregators, norm clipping and central DP.

- mean: sum_k n_k d_k / sum_k n_k, streamed (a batch of at most BATCH_UPDATES updates, BATCH_BYTES, in memory).
- median: coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates"); trimmed_mean: per coordinate, drop the `trim_ratio` largest and smallest values (same paper).
- krum / multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
  Descent"): score each delta by the summed squared distances to its K - f - 2 nearest others, average the m best;
  refused unless K > 2f + 2, the paper's condition (and at load: run.quorum must exceed 2f + 2).
  These three are unweighted and hold all K deltas: memory O(K x model).
- clip_norm C > 0: every delta is scaled to L2 norm at most C before aggregation.
- clip_mode adaptive: C follows a quantile of the update norms (Andrew et al. 2021, privacy.py).
- Central DP (DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models"):
  clip to C, unweighted mean, plus Gaussian noise N(0, (sigma C / K)^2) per coordinate; the privacy spent, with
  the round's client sampling, is accounted by privacy.py (RDP, dp-accounting).
- lora_aggregation exact / flora: LoRA pairs through their products (lora_exact.py, lora_aggregation.py).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence

import torch

from . import privacy, slices
from .base import ClientUpdate, Tensors
from .config import AlgorithmConfig
from .privacy import DP_ROUNDS, Sampling, dp_epsilon  # noqa: F401 - dp_epsilon: the accountant's name since DP landed

DP_SEED = "dp.seed"


def initial_dp_state(config: AlgorithmConfig) -> Tensors:
    """A secret noise seed (never leaves the coordinator) when DP is on; nothing otherwise."""
    if config.dp_noise_multiplier <= 0:
        return {}
    return {DP_SEED: torch.tensor(secrets.randbits(62), dtype=torch.int64),
            DP_ROUNDS: torch.tensor(0, dtype=torch.int64)}


def combine(config: AlgorithmConfig, base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], state: Tensors,
            round_index: int, sampling: Sampling | None = None) -> tuple[Tensors, Tensors, dict[str, float]]:
    """(aggregated delta in float64, unweighted mean of the aux tensors, metrics); may update `state` (DP,
    adaptive clipping, FLoRA's stack). `sampling`: how the round's sites were drawn (None: no amplification)."""
    if not updates:
        raise ValueError("aggregation needs at least one update")
    if config.lora_aggregation == "exact":
        from .lora_exact import exact_lora_mean

        merged, aux_mean = exact_lora_mean(updates, {n: t.shape[0] for n, t in base.items()})
        return {n: v - base[n].double() for n, v in merged.items()}, aux_mean, {}
    if config.lora_aggregation == "flora":
        from .lora_aggregation import flora_stack

        return flora_stack(base, updates, state)
    used = privacy.round_config(config, state)  # adaptive clipping: this round's norm and noise share
    if used.aggregator == "mean":
        delta, aux_mean, metrics = _streaming_mean(used, base, updates, state, round_index)
    else:
        delta, aux_mean, metrics = _robust(used, base, updates)
    dp = config.dp_noise_multiplier > 0
    if config.clip_mode == "adaptive":
        seed = privacy.count_seed(_noise_seed(state, round_index)) if dp else round_index
        unclipped = len(updates) - int(metrics["clipped_updates"])
        metrics.update(privacy.adapt_clip_norm(config, state, used, unclipped, len(updates), seed))
    if dp:
        metrics.update(privacy.spend(config, state, sampling))
    return delta, aux_mean, metrics


def _robust(config, base, updates):
    deltas, aux_sum, names = [], {}, None
    clipped = 0
    for index, update in enumerate(updates):
        tensors, aux = update.load()
        names = _check_names(index, names, tensors)
        delta, was_clipped = _clipped_delta(config, base, tensors)
        clipped += was_clipped
        deltas.append(delta)
        _accumulate(aux_sum, aux, 1.0)
    robust = {"median": median, "trimmed_mean": lambda d: trimmed_mean(d, config.trim_ratio),
              "krum": lambda d: krum(d, config.krum_byzantine, config.krum_select)}[config.aggregator]
    aux_mean = {n: v / len(updates) for n, v in aux_sum.items()}
    return robust(deltas), aux_mean, {"clipped_updates": float(clipped)} if config.clip_norm > 0 else {}


def _streaming_mean(config, base, updates, state, round_index):
    dp = config.dp_noise_multiplier > 0
    acc: Tensors = {}
    aux_sum: Tensors = {}
    total = 0.0
    clipped = 0
    names = None
    deltas = _Deltas()
    batch: list[tuple[Tensors, float]] = []  # loaded updates not yet added, with their factors
    for index, update in enumerate(updates):
        if update.weight <= 0:
            raise ValueError(f"update {index}: weight must be positive, got {update.weight}")
        tensors, aux = update.load()
        names = _check_names(index, names, tensors)
        scale = _clip_scale(config, base, tensors)
        clipped += scale < 1.0
        weight = 1.0 if dp else float(update.weight)  # DP bounds each site's influence: equal weights
        batch.append((tensors, weight * scale))
        _accumulate(aux_sum, aux, 1.0)
        total += weight
        last = index == len(updates) - 1
        if len(batch) >= _batch_size(tensors) or last:
            _add_batch(deltas, acc, base, batch, total if last else None)  # the last batch also divides
            batch = []
    mean = acc  # divided in place: no second float64 copy of the model
    aux_mean = {n: v / len(updates) for n, v in aux_sum.items()}
    metrics: dict[str, float] = {"clipped_updates": float(clipped)} if config.clip_norm > 0 else {}
    if dp:
        std = config.dp_noise_multiplier * config.clip_norm / len(updates)
        generator = torch.Generator().manual_seed(_noise_seed(state, round_index))
        for name in sorted(mean):
            mean[name] = mean[name] + torch.randn(mean[name].shape, generator=generator, dtype=torch.float64) * std
    return mean, aux_mean, metrics


# Updates added together, a slice at a time: the float64 accumulator and the base cross memory once per batch
# instead of once per update (bench/aggregation_speed.py: about 2x a numpy accumulate one at a time, 1.0-1.1x four
# at a time). Bounded in bytes, so memory stays flat in K and large updates are still taken one at a time.
BATCH_UPDATES = 4
BATCH_BYTES = 256 << 20


def _batch_size(tensors: Mapping[str, torch.Tensor]) -> int:
    """How many updates of this one's size are held and added together."""
    size = sum(t.nbytes for t in tensors.values())
    return max(1, min(BATCH_UPDATES, BATCH_BYTES // max(size, 1)))


def _add_batch(deltas: _Deltas, acc: Tensors, base: Mapping[str, torch.Tensor],
               batch: Sequence[tuple[Tensors, float]], divisor: float | None) -> None:
    """acc[name] += alpha * (tensor - base) for every update of the batch in order, tensor by tensor (each is
    released once added); then acc[name] /= divisor unless it is None."""
    for name in sorted(batch[0][0]):
        parts = [(tensors.pop(name), alpha) for tensors, alpha in batch]
        first = name not in acc
        if first:
            acc[name] = torch.empty(parts[0][0].shape, dtype=torch.float64)
        deltas.add(acc[name], base[name], parts, first, divisor)


def _noise_seed(state: Mapping[str, torch.Tensor], round_index: int) -> int:
    if DP_SEED not in state:
        raise ValueError("DP is on but the server state has no noise seed (state created without DP?)")
    key = f"{int(state[DP_SEED])}:{round_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & ((1 << 63) - 1)


def _check_names(index: int, names: set[str] | None, tensors: Mapping[str, torch.Tensor]) -> set[str]:
    """Every update of a round must carry the same tensors; returns that set."""
    current = set(tensors)
    if names is not None and current != names:
        raise ValueError(f"update {index}: tensors differ from the round's first update "
                         f"(missing {sorted(names - current)[:3]}, extra {sorted(current - names)[:3]})")
    return current


def _clip_scale(config: AlgorithmConfig, base: Mapping[str, torch.Tensor],
                tensors: Mapping[str, torch.Tensor]) -> float:
    """The factor that brings this site's whole delta to L2 norm <= clip_norm (1.0 when clipping is off)."""
    if config.clip_norm <= 0:
        return 1.0
    norm = math.sqrt(sum(float((t.double() - base[n].double()).square().sum()) for n, t in tensors.items()))
    return min(1.0, config.clip_norm / norm) if norm > 0 else 1.0


def _clipped_delta(config: AlgorithmConfig, base: Mapping[str, torch.Tensor],
                   tensors: Mapping[str, torch.Tensor]) -> tuple[Tensors, bool]:
    """This site's delta in float64, clipped; and whether clipping changed it."""
    scale = _clip_scale(config, base, tensors)
    return {n: (t.double() - base[n].double()) * scale for n, t in tensors.items()}, scale < 1.0


class _Deltas:
    """acc += alpha_k * (tensor_k.double() - base.double()) for k = 1..B, without a temporary the size of a tensor.

    The same float64 operations, in the same order, as that expression applied update after update (so the result
    is bit-identical to it), a slice at a time (slices.py): the base converted once per slice and batch, and the
    accumulator's slice read and written while it is in cache for all B updates. ``first``: acc holds garbage and
    becomes alpha_1 * delta_1 (a multiplication, as the first term always was, keeping the sign of zeros).
    ``divisor``: the slice is then divided by it (the mean's last step, while the slice is in cache).
    """

    def __init__(self) -> None:
        self.scratch = slices.Scratch(2)

    def add(self, acc: torch.Tensor, base: torch.Tensor, parts: Sequence[tuple[torch.Tensor, float]],
            first: bool, divisor: float | None) -> None:
        for tensor, _ in parts:
            slices.check_shape(tensor, base, "update tensor")
        flat_acc, flat_base = acc.view(-1), base.reshape(-1)
        flats = [(tensor.reshape(-1), alpha) for tensor, alpha in parts]
        for part, (delta, base_part) in self.scratch.slices(flat_acc.numel()):
            acc_part = flat_acc[part]
            base_part.copy_(flat_base[part])
            for index, (values, alpha) in enumerate(flats):
                delta.copy_(values[part])
                delta.sub_(base_part)
                if first and index == 0:
                    torch.mul(delta, alpha, out=acc_part)
                else:
                    acc_part.add_(delta, alpha=alpha)
            if divisor is not None:
                acc_part.div_(divisor)


def _accumulate(acc: Tensors, tensors: Mapping[str, torch.Tensor], weight: float) -> None:
    """acc[name] += weight * tensor, in float64, for every tensor."""
    for name, tensor in tensors.items():
        if name in acc:
            acc[name].add_(tensor.double(), alpha=weight)
        else:
            acc[name] = tensor.double() * weight


def _sorted_stack(deltas: Sequence[Mapping[str, torch.Tensor]], name: str) -> torch.Tensor:
    return torch.stack([d[name].double() for d in deltas]).sort(dim=0).values


def median(deltas: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Coordinate-wise median; the mean of the two middle values when the count is even."""
    k = len(deltas)
    out = {}
    for name in deltas[0]:
        ordered = _sorted_stack(deltas, name)
        out[name] = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return out


def trimmed_mean(deltas: Sequence[Mapping[str, torch.Tensor]], trim_ratio: float) -> Tensors:
    """Per coordinate, drop the floor(trim_ratio * K) largest and smallest values and average the rest."""
    k = len(deltas)
    cut = math.floor(trim_ratio * k)
    if k - 2 * cut < 1:
        raise ValueError(f"trimmed mean with trim_ratio {trim_ratio} leaves nothing of {k} updates")
    return {name: _sorted_stack(deltas, name)[cut:k - cut].mean(dim=0) for name in deltas[0]}


def krum(deltas: Sequence[Mapping[str, torch.Tensor]], byzantine: int, select: int) -> Tensors:
    """(Multi-)Krum: score each delta by the summed squared distances to its K - f - 2 nearest others and average
    the `select` best-scored deltas (ties keep the earlier update)."""
    k = len(deltas)
    if k <= 2 * byzantine + 2:  # Blanchard et al.'s condition for the resilience guarantee
        raise ValueError(f"krum with f = {byzantine} byzantine sites needs K > 2f + 2 = {2 * byzantine + 2} updates, "
                         f"got K = {k}")
    neighbours = k - byzantine - 2
    names = sorted(deltas[0])
    flat = torch.stack([torch.cat([d[n].double().reshape(-1) for n in names]) for d in deltas])
    distances = torch.cdist(flat, flat).square()
    scores = torch.stack([distances[i][torch.arange(k) != i].sort().values[:neighbours].sum() for i in range(k)])
    chosen = torch.argsort(scores, stable=True)[:max(1, min(select, k))].tolist()
    return {name: torch.stack([deltas[i][name].double() for i in chosen]).mean(dim=0) for name in names}
