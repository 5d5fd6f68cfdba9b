"""Central DP's accounting, its budget, and adaptive clipping: what `aggregation.combine` spends per round and what
the round driver checks before it opens one.

Adjacency: replace one site (the number of sites and of updates per round is public; the coordinator publishes
it and divides the noised sum by it). The sum of K clipped deltas then has L2 sensitivity 2C, so noise of
std sigma C on the sum is a Gaussian mechanism with noise multiplier sigma / 2.

Sampling: the coordinator draws ``clients_per_round`` sites uniformly *without replacement* from the live sites
(`base.sample_clients`), and opens a round only when at least ``min_clients`` are live. That is fixed-size
sampling, not Poisson sampling, so Poisson amplification does not apply; the RDP bound for sampling without
replacement under replace-one adjacency does (Wang, Balle, Kasiviswanathan 2019, "Subsampled Renyi Differential
Privacy and Analytical Moments Accountant", Theorem 27; dp-accounting's ``SampledWithoutReplacementDpEvent``).
Its rate q = m / n uses n = ``min_clients``, a lower bound of the live sites a round is drawn from, so the q used
is never below the true one (the bound stays valid when more sites are live). A round drawn again after a missed
quorum mixes two draws: it is accounted without amplification (q = 1).

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping"): the clip norm
C follows the ``clip_quantile`` gamma of the sites' update norms, C <- C exp(-eta (b - gamma)), with b the fraction
of unclipped updates plus Gaussian noise of std ``clip_count_stddev`` / K. The count is a second Gaussian query
(sensitivity 1); to keep the round's privacy at noise multiplier z = ``dp_noise_multiplier`` the delta's noise
multiplier is raised to (z^-2 - (2 sigma_b)^-2)^(-1/2) (their Theorem 1), so the accountant sees one Gaussian of
multiplier z / 2 per round in both modes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .base import Tensors
from .config import AlgorithmConfig

DP_ROUNDS = "dp.rounds"
DP_SAMPLING = "dp.sampling"  # (rounds, 2) int64: (population n, sample m) of every released round
CLIP_NORM = "clip.norm"  # adaptive clipping: the clip norm of the next round


@dataclass(frozen=True)
class Sampling:
    """How a round's sites were drawn: `sample` of `population`, uniformly without replacement."""

    population: int
    sample: int

    def __post_init__(self) -> None:
        if not 1 <= self.sample <= self.population:
            raise ValueError(f"sampling {self.sample} of {self.population} sites")


FULL = Sampling(1, 1)  # every site of the round was certain to take part: no amplification


def epsilon(noise_multiplier: float, rounds: Sequence[Sampling], delta: float) -> float:
    """Epsilon at `delta` after one Gaussian release per entry of `rounds`, each sampled as it says (RDP
    accountant, replace-one adjacency: noise multiplier `noise_multiplier` / 2, see the module docstring)."""
    import dp_accounting  # imported here: only DP runs pay for it
    from dp_accounting.rdp import rdp_privacy_accountant

    if not rounds:
        return 0.0
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    counts: dict[Sampling, int] = {}
    for sampling in rounds:
        counts[sampling] = counts.get(sampling, 0) + 1
    accountant.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.SampledWithoutReplacementDpEvent(s.population, s.sample, gaussian), count)
        for s, count in sorted(counts.items(), key=lambda item: (item[0].population, item[0].sample))]))
    return float(accountant.get_epsilon(delta))


def dp_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` releases without sampling (`epsilon` with q = 1 throughout)."""
    return epsilon(noise_multiplier, [FULL] * rounds, delta)


def released(state: Mapping[str, torch.Tensor]) -> list[Sampling]:
    """The sampling of every round released so far (rounds from a state written before sampling was recorded
    count as unsampled)."""
    rows = [Sampling(int(n), int(m)) for n, m in state[DP_SAMPLING].tolist()] if DP_SAMPLING in state else []
    earlier = int(state.get(DP_ROUNDS, torch.tensor(0))) - len(rows)
    return [FULL] * max(0, earlier) + rows


def spend(config: AlgorithmConfig, state: Tensors, sampling: Sampling | None) -> dict[str, float]:
    """Record one more release (in `state`) and return the metrics of the privacy spent so far."""
    rows = released(state) + [sampling or FULL]
    state[DP_SAMPLING] = torch.tensor([[s.population, s.sample] for s in rows], dtype=torch.int64)
    state[DP_ROUNDS] = torch.tensor(len(rows), dtype=torch.int64)
    return {"dp_epsilon": epsilon(config.dp_noise_multiplier, rows, config.dp_delta), "dp_delta": config.dp_delta,
            "dp_rounds": float(len(rows))}


def budget_refusal(config: AlgorithmConfig, state: Mapping[str, torch.Tensor], sampling: Sampling | None,
                   round_index: int) -> str:
    """Why round `round_index`, drawn as `sampling`, must not start ("" if it may): its release would push epsilon
    at dp_delta over ``dp_max_epsilon``. Always "" without a budget."""
    if config.dp_max_epsilon <= 0:
        return ""
    spent = released(state)
    after = epsilon(config.dp_noise_multiplier, [*spent, sampling or FULL], config.dp_delta)
    if after <= config.dp_max_epsilon:
        return ""
    return (f"privacy budget reached after round {round_index - 1}: round {round_index} would spend epsilon "
            f"{after:.3g} > dp_max_epsilon {config.dp_max_epsilon:g} at delta {config.dp_delta:g} "
            f"(spent {epsilon(config.dp_noise_multiplier, spent, config.dp_delta):.3g} in {len(spent)} rounds)")


def round_config(config: AlgorithmConfig, state: Mapping[str, torch.Tensor]) -> AlgorithmConfig:
    """The config the round's combination runs with: with adaptive clipping, the current clip norm and (with DP)
    the delta's share of the noise multiplier; `config` itself with fixed clipping."""
    if config.clip_mode != "adaptive":
        return config
    clip = float(state[CLIP_NORM]) if CLIP_NORM in state else config.clip_norm
    noise = config.dp_noise_multiplier
    if noise > 0:
        noise = (noise ** -2 - (2 * config.clip_count_stddev) ** -2) ** -0.5
    return dataclasses.replace(config, clip_norm=clip, dp_noise_multiplier=noise)


def adapt_clip_norm(config: AlgorithmConfig, state: Tensors, used: AlgorithmConfig, unclipped: int, updates: int,
                    seed: int) -> dict[str, float]:
    """Adaptive clipping's step after a round that clipped with ``used.clip_norm`` and left `unclipped` of
    `updates` deltas unclipped: the next clip norm goes into `state`; returns the round's clipping metrics. The
    count's noise is drawn from a generator seeded with `seed` (the round's secret DP seed, or a public one without
    DP, where the count needs no noise)."""
    noise = 0.0
    if config.clip_count_stddev > 0:
        generator = torch.Generator().manual_seed(seed)
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * config.clip_count_stddev
    fraction = (unclipped + noise) / updates
    state[CLIP_NORM] = torch.tensor(used.clip_norm * math.exp(-config.clip_lr * (fraction - config.clip_quantile)),
                                    dtype=torch.float64)
    return {"clip_norm": used.clip_norm, "clip_unclipped_fraction": fraction}


def count_seed(noise_seed: int) -> int:
    """The seed of the count's noise, derived from (and independent of) the round's delta-noise seed."""
    return int.from_bytes(hashlib.sha256(f"{noise_seed}:clip-count".encode()).digest()[:8], "big") & ((1 << 63) - 1)


def round_sampling(min_clients: int, clients_per_round: int, attempt: int) -> Sampling:
    """How the coordinator's draw number `attempt` (1 = the round's first) samples a round, for the accountant:
    `clients_per_round` of at least `min_clients` live sites; a later draw (after a missed quorum) as unsampled."""
    return Sampling(max(min_clients, clients_per_round), clients_per_round) if attempt == 1 else FULL
