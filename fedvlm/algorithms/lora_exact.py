"""Exact aggregation of LoRA products with SVD re-factorisation (``lora_aggregation = "exact"``, alias
``lora_exact = true``): the FlexLoRA step (Bai et al. 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"), also used by HLoRA. The problem it addresses is stated in Sun et al.
2024 (FFA-LoRA). It is *not* FLoRA (Wang et al. 2024), which stacks the sites' factors instead of averaging their
products (lora_aggregation.py).

Averaging the factors separately gives mean(B) mean(A), which is not mean(B A): the cross terms B_j A_k (j != k)
are noise. Here the weighted mean of the products P = sum_k n_k B_k A_k / sum_k n_k is computed exactly and
re-factorised to the sites' rank r with a truncated SVD, P ~ U_r S_r V_r^T, B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T,
the best rank-r approximation of P (Eckart-Young). The mean of K rank-r products has rank up to K r, so the
truncation error is what the shared rank r cannot hold. Sites may train other ranks than the global's
(heterogeneous ranks): the products do not depend on the rank, so the output keeps the global's rank;
a site re-factorises each downloaded pair to its own rank (`fit_lora_ranks`) and intake accepts a LoRA pair whose
rank dimension differs from the global's (`rank_flexible_schema`). Cost: one dense (out x in) accumulator and one
SVD per LoRA pair, instead of two r-row factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .base import ClientUpdate, Tensors

Schema = dict[str, tuple[tuple[int, ...], str]]

A_SUFFIX = "lora_A.weight"
B_SUFFIX = "lora_B.weight"


def lora_pairs(names: set[str]) -> list[tuple[str, str]]:
    """(A name, B name) for every LoRA pair present in `names`."""
    return sorted((a, a[: -len(A_SUFFIX)] + B_SUFFIX) for a in names
                  if a.endswith(A_SUFFIX) and a[: -len(A_SUFFIX)] + B_SUFFIX in names)


def exact_lora_mean(updates: Sequence[ClientUpdate],
                    ranks: Mapping[str, int] | None = None) -> tuple[Tensors, Tensors]:
    """(New values in float64: LoRA pairs re-factorised from the mean product, other tensors averaged; the
    unweighted mean of the aux tensors). Streams the updates one at a time.

    ``ranks`` (A name -> rank) sets the output rank of each pair, e.g. the global's; sites may then hold other
    ranks (the products do not depend on them). Default: the first update's ranks."""
    sums: Tensors = {}
    aux_sum: Tensors = {}
    pairs: list[tuple[str, str]] = []
    total = 0.0
    for index, update in enumerate(updates):
        tensors, aux = update.load()
        if index == 0:
            pairs = lora_pairs(set(tensors))
            ranks = dict(ranks) if ranks is not None else {a: tensors[a].shape[0] for a, _ in pairs}
        paired = {n for pair in pairs for n in pair}
        w = float(update.weight)
        for a, b in pairs:
            product = tensors[b].double() @ tensors[a].double()
            key = f"{a}|{b}"
            sums[key] = sums[key].add_(product, alpha=w) if key in sums else product * w
        for name, tensor in tensors.items():
            if name not in paired:
                sums[name] = sums[name].add_(tensor.double(), alpha=w) if name in sums else tensor.double() * w
        for name, tensor in aux.items():
            aux_sum[name] = aux_sum[name] + tensor.double() if name in aux_sum else tensor.double().clone()
        total += w
    out: Tensors = {}
    for name, acc in sums.items():
        if "|" not in name:
            out[name] = acc / total
    for a, b in pairs:
        product = sums[f"{a}|{b}"] / total
        out[b], out[a] = refactorise(product, ranks[a])
    return out, {n: v / len(updates) for n, v in aux_sum.items()}


def refactorise(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-`rank` approximation of `product`, the singular values split evenly."""
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def lora_ranks(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """A name -> rank of every 2-D LoRA pair in ``shapes`` (name -> shape)."""
    return {a: shapes[a][0] for a, b in lora_pairs(set(shapes)) if len(shapes[a]) == 2 and len(shapes[b]) == 2}


def refactorise_pair(b: torch.Tensor, a: torch.Tensor, rank: int,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') of rank `rank` (in the dtypes of `b`, `a`) from the pair (B: out x r, A: r x in).

    B' A' is the best rank-`rank` approximation of B A (Eckart-Young), so for rank >= rank(B A) it equals B A.
    Directions the product does not use (rank > rank(B A), e.g. the initial adapter whose B is zero) get a zero
    column of B' and a row of A' drawn uniformly from +-1/sqrt(in) (PEFT's kaiming init of lora_A) with
    `generator`: B' A' is unchanged and training can still move them (a zero row of A and a zero column of B would
    get no gradient). Cost O((out + in) r^2): QR of both factors and an SVD of the r x r core, no out x in matrix.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    out_dim, in_dim = b.shape[0], a.shape[1]
    qb, rb = torch.linalg.qr(b.double())      # B = Qb Rb
    qa, ra = torch.linalg.qr(a.double().T)    # A = Ra^T Qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T)    # B A = (Qb U) S (Qa V)^T
    tol = (s.max() if s.numel() else 0.0) * max(out_dim, in_dim) * torch.finfo(torch.float32).eps
    keep = min(rank, int((s > tol).sum()))
    root = s[:keep].sqrt()
    new_b = (qb @ u[:, :keep]) * root
    new_a = root[:, None] * (vh[:keep] @ qa.T)
    if rank > keep:
        bound = 1.0 / math.sqrt(in_dim)
        noise = (torch.rand(rank - keep, in_dim, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        new_a = torch.cat([new_a, noise])
        new_b = torch.cat([new_b, torch.zeros(out_dim, rank - keep, dtype=torch.float64)], dim=1)
    return new_b.to(b.dtype).contiguous(), new_a.to(a.dtype).contiguous()


def fit_lora_ranks(tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int], seed: int) -> Tensors:
    """`tensors` with every LoRA pair whose rank differs from ``ranks[A name]`` re-factorised to that rank
    (`refactorise_pair`, padding drawn from a generator seeded with `seed`, pairs in sorted order); pairs already
    at their rank and all other tensors are returned as they are."""
    out = dict(tensors)
    generator = torch.Generator().manual_seed(seed)
    for a, b in lora_pairs(set(tensors)):
        if a in ranks and tensors[a].shape[0] != ranks[a]:
            out[b], out[a] = refactorise_pair(tensors[b], tensors[a], ranks[a], generator)
    return out


def rank_flexible_schema(actual: Schema, expected: Schema) -> Schema:
    """`expected` (the global's schema) with the rank dimension of each 2-D LoRA pair taken from `actual` (an
    update's schema), after checking the pair: lora_A (R, in) and lora_B (out, R) with the global's `in` and
    `out`, one R for both, 1 <= R <= min(in, out). Anything else (other tensors, dtypes, a pair the update carries
    only half of) is left to the exact comparison. :class:`fedvlm.adapters.AdapterError` for a malformed pair."""
    from fedvlm.adapters import AdapterError

    out = dict(expected)
    for a, b in lora_pairs(set(expected)):
        if a not in actual or b not in actual:
            continue
        (ea, a_dtype), (eb, b_dtype) = expected[a], expected[b]
        sa, sb = tuple(actual[a][0]), tuple(actual[b][0])
        if len(ea) != 2 or len(eb) != 2 or (sa, sb) == (tuple(ea), tuple(eb)):
            continue
        in_dim, out_dim = ea[1], eb[0]
        if len(sa) != 2 or len(sb) != 2 or sa[1] != in_dim or sb[0] != out_dim:
            raise AdapterError(f"LoRA pair {a} / {b}: expected shapes (R, {in_dim}) / ({out_dim}, R), got {sa} / {sb}")
        if sa[0] != sb[1]:
            raise AdapterError(f"LoRA pair {a} / {b}: ranks differ within the pair ({sa[0]} vs {sb[1]})")
        if not 1 <= sa[0] <= min(in_dim, out_dim):
            raise AdapterError(f"LoRA pair {a}: rank {sa[0]} is outside 1..{min(in_dim, out_dim)}")
        out[a], out[b] = (sa, a_dtype), (sb, b_dtype)
    return out
