"""How LoRA factors are federated (``task.algorithm.lora_aggregation``): which factors a site trains and sends in
a round, and the server side of the methods that do not simply average what was sent.

- factors: A and B trained, sent and averaged separately (FedAvg of the factors; mean(B) mean(A) != mean(B A)).
- exact: the mean of the products B_k A_k re-factorised by SVD (lora_exact.py; FlexLoRA / HLoRA style).
- ffa: FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", ICLR): A stays at
  its shared initialisation (every site builds the same A from the task's seed), only B is trained and sent.
  mean(B_k) A = mean(B_k A), so averaging is exact, and the upload is the B half of the pairs.
- rolora: RoLoRA (Chen et al. 2025, "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA"):
  B in odd rounds, A in even rounds, the other factor frozen at the global's value; each round's mean is exact
  (one factor is shared) and the upload is half. B goes first because PEFT initialises B = 0: the gradient of A is
  B^T (dL/dY) x^T = 0 while B is zero, so an A-first round 1 would train nothing.
- flora: FLoRA stacking (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
  Low-Rank Adaptations", NeurIPS): every site trains a fresh LoRA of its own rank from its initialisation; the
  server stacks the round's pairs, B = [p_1 B_1 .. p_K B_K], A = [A_1; ..; A_K] (p_k = n_k / sum n), so that
  B A = sum_k p_k B_k A_k exactly for any ranks, and appends them to the run's stack. The global carries the stack
  as aux tensors ``flora.B/<B name>`` / ``flora.A/<A name>``; a site merges scaling x B A into its frozen base
  weights (W = W0 + s B A, `merge_stack`) and restarts its LoRA from the initialisation. The stack of a pair is
  re-factorised exactly (QR + SVD of the core) once its rank exceeds min(out, in), so it never outgrows a dense
  matrix's rank. An export is a PEFT LoRA adapter of the stack's rank on the unmerged base (`export_tensors`).

The partial uploads of ffa / rolora use the same mechanism as F-2stage's stages (`fedvlm.vlm.finetuning`): the site
freezes and leaves out what the round does not train, intake accepts a subset of the global's tensors that every
update of the round shares, and `base.next_global` keeps the base's values of the tensors no update carries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

from .base import ClientUpdate, Tensors
from .lora_exact import lora_pairs, refactorise_pair

BOTH, ONLY_A, ONLY_B = frozenset("AB"), frozenset("A"), frozenset("B")
STACK_A, STACK_B = "flora.A/", "flora.B/"
_FACTOR = re.compile(r"\.lora_(?:embedding_)?([AB])(?=\.|$)")


def trained_factors(method: str, round_index: int | None) -> frozenset[str]:
    """The LoRA factors ("A", "B") that round `round_index` trains and sends under `method` (both for round 0, the
    initial adapter, and for None, every tensor)."""
    if round_index is None or round_index < 1:
        return BOTH
    if method == "ffa":
        return ONLY_B
    if method == "rolora":
        return ONLY_B if round_index % 2 == 1 else ONLY_A
    return BOTH


def factor_of(name: str) -> str | None:
    """"A" or "B" for a LoRA factor's tensor or parameter name, None for anything else."""
    match = _FACTOR.search(name)
    return match.group(1) if match else None


def flora_stack(base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                state: Tensors) -> tuple[Tensors, Tensors, dict[str, float]]:
    """FLoRA's combination (as `aggregation.combine` returns it): the round's pairs stacked onto the stack in
    `state` (updated in place); the delta of every other tensor is the example-weighted mean; LoRA tensors get no
    delta (the global keeps its initial LoRA, which every site restarts from). Streams the updates."""
    total = sum(float(u.weight) for u in updates)
    sums: Tensors = {}
    aux_sum: Tensors = {}
    round_b: dict[str, list[torch.Tensor]] = {}
    round_a: dict[str, list[torch.Tensor]] = {}
    for index, update in enumerate(updates):
        if update.weight <= 0:
            raise ValueError(f"update {index}: weight must be positive, got {update.weight}")
        tensors, aux = update.load()
        share = float(update.weight) / total
        pairs = lora_pairs(set(tensors))
        paired = {n for pair in pairs for n in pair}
        for a, b in pairs:
            round_a.setdefault(a, []).append(tensors[a].double())
            round_b.setdefault(b, []).append(tensors[b].double() * share)
        for name, tensor in tensors.items():
            if name not in paired:
                delta = (tensor.double() - base[name].double()) * share
                sums[name] = sums[name].add_(delta) if name in sums else delta
        for name, tensor in aux.items():
            aux_sum[name] = aux_sum[name] + tensor.double() if name in aux_sum else tensor.double().clone()
    stacked_rank = 0
    for a, b in lora_pairs(set(round_a) | set(round_b)):
        if len(round_a[a]) != len(updates):
            raise ValueError(f"LoRA pair {a}: carried by {len(round_a[a])} of {len(updates)} updates")
        new_b = torch.cat([*([state[STACK_B + b]] if STACK_B + b in state else []), *round_b[b]], dim=1)
        new_a = torch.cat([*([state[STACK_A + a]] if STACK_A + a in state else []), *round_a[a]], dim=0)
        limit = min(new_b.shape[0], new_a.shape[1])
        if new_a.shape[0] > limit:  # exact: B A has rank <= limit
            new_b, new_a = refactorise_pair(new_b, new_a, limit)
        state[STACK_B + b], state[STACK_A + a] = new_b, new_a
        stacked_rank = max(stacked_rank, new_a.shape[0])
    return sums, {n: v / len(updates) for n, v in aux_sum.items()}, {"flora_stack_rank": float(stacked_rank)}


def published_stack(state: Mapping[str, torch.Tensor]) -> Tensors:
    """The stack as the global carries it (aux tensors, float32)."""
    return {k: v.float().contiguous() for k, v in sorted(state.items()) if k.startswith((STACK_A, STACK_B))}


def module_of(tensor_name: str) -> str:
    """The PEFT module path of a LoRA factor's tensor (``...q_proj.lora_A.weight`` -> ``...q_proj``)."""
    return tensor_name[: _FACTOR.search(tensor_name).start()]


def merge_stack(model: torch.nn.Module, stack: Mapping[str, torch.Tensor], originals: dict[str, torch.Tensor]) -> int:
    """Set every LoRA layer's frozen base weight to W0 + scaling x B A from `stack` (the global's ``flora.*`` aux
    tensors, keyed by adapter tensor names) — W0 kept in `originals` (module path -> first-seen weight), so merging
    the next global replaces rather than adds. Layers the stack does not name are set back to W0. Returns the
    number of layers merged. ``ValueError`` for a layer whose base is not a plain (unquantized) Linear weight."""
    merged = 0
    prefix = "base_model.model."
    for name, module in model.named_modules():
        base_layer = getattr(module, "base_layer", None)
        if base_layer is None or not hasattr(module, "lora_A"):
            continue
        key = name[len(prefix):] if name.startswith(prefix) else name
        b_name, a_name = f"{STACK_B}{prefix}{key}.lora_B.weight", f"{STACK_A}{prefix}{key}.lora_A.weight"
        if not isinstance(base_layer, torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
            if b_name in stack:
                raise ValueError(f"lora_aggregation flora: cannot merge into {name} ({type(base_layer).__name__})")
            continue
        weight = base_layer.weight
        original = originals.setdefault(key, weight.detach().clone())
        with torch.no_grad():
            if b_name in stack:
                scaling = float(module.scaling["default"])
                product = stack[b_name].to(weight.device, torch.float32) @ stack[a_name].to(weight.device,
                                                                                            torch.float32)
                weight.copy_((original.float() + scaling * product).to(weight.dtype))
                merged += 1
            else:
                weight.copy_(original)
    return merged


def export_tensors(tensors: Mapping[str, torch.Tensor], stack: Mapping[str, torch.Tensor],
                   config: dict) -> tuple[Tensors, dict]:
    """A FLoRA global as a PEFT adapter on the *unmerged* base: (adapter tensors, adapter_config). Every stacked
    pair replaces the global's (initial, B = 0) pair, with scaling folded into B and, per module, ``rank_pattern``
    = the stack's rank and ``alpha_pattern`` making PEFT's scaling 1, so W0 + B' A' = the merged weight exactly.
    Pairs without a stack keep the initial adapter (B = 0: no change)."""
    out = dict(tensors)
    config = dict(config)
    rslora = bool(config.get("use_rslora"))
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if rslora else config["r"])
    ranks, alphas = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    for a, b in lora_pairs(set(tensors)):
        if STACK_B + b not in stack:
            continue
        out[b] = (stack[STACK_B + b].double() * scaling).float().contiguous()
        out[a] = stack[STACK_A + a].float().contiguous()
        rank = out[a].shape[0]
        module = module_of(a).removeprefix("base_model.model.")
        ranks[module], alphas[module] = rank, (math.sqrt(rank) if rslora else rank)
    config["rank_pattern"], config["alpha_pattern"] = ranks, alphas
    return out, config
