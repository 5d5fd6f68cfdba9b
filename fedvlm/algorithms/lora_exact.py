"""Exact aggregation of LoRA factors (the problem stated in Sun et al. 2024, "Improving LoRA in Privacy-preserving
Federated Learning" (FFA-LoRA) and solved by re-factorisation in Wang et al. 2024, "FLoRA: Federated Fine-Tuning
Large Language Models with Heterogeneous Low-Rank Adaptations").

Averaging the factors separately gives mean(B) mean(A), which is not mean(B A): the cross terms B_j A_k (j != k)
are noise. Here the weighted mean of the products P = sum_k n_k B_k A_k / sum_k n_k is computed exactly and
re-factorised to the sites' rank r with a truncated SVD, P ~ U_r S_r V_r^T, B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T,
the best rank-r approximation of P (Eckart-Young). The mean of K rank-r products has rank up to K r, so the
truncation error is what the shared rank r cannot hold. The math takes sites of different ranks (the output
rank is the global's), but the wire requires every update to match the global's schema, so in a federation all
sites share the rank. Cost: one dense (out x in)
accumulator and one SVD per LoRA pair, instead of two r-row factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import ClientUpdate, Tensors

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
