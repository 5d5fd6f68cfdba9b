"""Fine-tuning strategies (FedVLMBench): which parameters of a VLM train, expressed as one PEFT LoRA config.

- F-C:      the connector (vision -> language projector; the patch embedding of an encoder-free model) trains
            fully; nothing else.
- F-L:      LoRA on the language model's linear layers; nothing else.
- F-CL:     both (the default).
- F-2stage: the adapter holds both parts (as F-CL), but rounds ``< switch_round`` train only the connector and
            rounds ``>= switch_round`` only the LoRA layers (connector frozen at what the first stage learned). The
            stage is a pure function of the round number, so coordinator and sites agree without talking.

The vision encoder never trains: LoRA targets are a regex anchored at the language model's module path, because
plain suffixes like ``q_proj`` also match the CLIP vision tower. The connector is carried with ``modules_to_save``;
F-C uses PEFT's "dummy-target-modules" (an adapter with no LoRA layers, only modules to save). "all-linear" LoRA
targets every ``nn.Linear`` inside the language model, so fused attention (Fuyu/Persimmon ``query_key_value``)
works like split q/k/v.

Where the parts are is looked up by ``config.model_type`` in the family table (``fedvlm.vlm.families.FAMILIES``);
an unknown model type is a clear ``UnknownFamilyError``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings

import torch
from torch import nn

from fedvlm.algorithms.lora_aggregation import BOTH, factor_of
from fedvlm.spec import LoraSpec
from fedvlm.vlm.families import Family, family_of

logger = logging.getLogger(__name__)

DUMMY_TARGET_MODULES = "dummy-target-modules"  # peft.utils.constants.DUMMY_TARGET_MODULES
CONNECTOR_STAGE, LORA_STAGE = "connector", "lora"


def find_parts(model: nn.Module) -> Family:
    """The family row of ``model`` (fedvlm.vlm.families) by ``config.model_type``, checked against the model:
    ``UnknownFamilyError`` for an unknown type, ``ValueError`` when the row's modules are not in the model (e.g. a
    different transformers version renamed them). ``vision_tower`` is None when the model has none (fedvlm_llava
    encoder-free); connector modules the model lacks (optional extras) are left out."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model_type, type(model).__name__)
    names = {name for name, module in model.named_modules() if module is not None}
    missing = [p for p in (family.language_model, family.connector) if p not in names]
    if missing:
        raise ValueError(f"{type(model).__name__} ({model_type}) has no module {', '.join(missing)}")
    vision = family.vision_tower if family.vision_tower in names else None
    extras: list[str] = []
    for path in (c for c in family.extra_connectors if c in names):
        module = model.get_submodule(path)
        # PEFT's modules_to_save wraps single modules: a ModuleList (Qwen3-VL's deepstack mergers) is its children.
        extras += [f"{path}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [path]
    return dataclasses.replace(family, vision_tower=vision, extra_connectors=tuple(extras))


def lora_target_regex(model: nn.Module, parts: Family, targets: tuple[str, ...]) -> str:
    """A regex (PEFT full-match semantics) selecting the LM's linear layers whose last name is in ``targets``.

    ``("all-linear",)`` means every ``nn.Linear`` inside the language model. Unknown suffixes raise ``ValueError``.
    """
    prefix = parts.language_model + "."
    linear_suffixes = sorted(
        {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
         if name.startswith(prefix) and isinstance(mod, nn.Linear)}
    )
    if not linear_suffixes:
        raise ValueError(f"no linear layers under {parts.language_model}")
    if tuple(targets) == ("all-linear",):
        chosen = linear_suffixes
    else:
        unknown = sorted(set(targets) - set(linear_suffixes))
        if unknown:
            raise ValueError(
                f"task.lora.targets: {', '.join(unknown)} not linear layers of the language model "
                f"(available: {', '.join(linear_suffixes)})"
            )
        chosen = sorted(set(targets))
    return rf"{re.escape(prefix)}(.*\.)?({'|'.join(re.escape(s) for s in chosen)})"


def lora_config_for(model: nn.Module, strategy: str, lora: LoraSpec, rank: int = 0):
    """The ``peft.LoraConfig`` whose adapter holds exactly the strategy's tensors (F-2stage: both parts).

    ``rank`` (0 = ``lora.r``): a site-local LoRA rank (heterogeneous ranks with exact LoRA aggregation); alpha is
    scaled with it (``lora.alpha * rank / lora.r``) so that PEFT's scaling alpha/r, and hence the meaning of the
    product B·A, is the same on every site."""
    from peft import LoraConfig

    if strategy not in ("F-C", "F-L", "F-CL", "F-2stage"):
        raise ValueError(f"task.strategy: unknown strategy {strategy!r} (known: F-C, F-L, F-CL, F-2stage)")
    parts = find_parts(model)
    uses_lora = strategy in ("F-L", "F-CL", "F-2stage")
    trains_connector = strategy in ("F-C", "F-CL", "F-2stage")
    return LoraConfig(
        r=rank or lora.r,
        lora_alpha=lora.alpha * rank / lora.r if rank and rank != lora.r else lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(model, parts, lora.targets) if uses_lora else DUMMY_TARGET_MODULES,
        modules_to_save=list(parts.connectors) if trains_connector else None,
        bias="none",
    )


def stage_for_round(strategy: str, switch_round: int, round_index: int) -> str | None:
    """F-2stage: ``"connector"`` for rounds before ``switch_round``, ``"lora"`` from it on; None for the other
    strategies (they train all their tensors every round). Round 0 (the initial adapter) counts as before."""
    if strategy != "F-2stage":
        return None
    return CONNECTOR_STAGE if round_index < switch_round else LORA_STAGE


def is_lora_key(name: str) -> bool:
    """True for LoRA tensors/parameters (``lora_A``/``lora_B``/...); False for the connector's copies."""
    return ".lora_" in name


def _trains(name: str, stage: str | None, factors: frozenset[str]) -> bool:
    if is_lora_key(name):
        return stage in (None, LORA_STAGE) and factor_of(name) in (None, *factors)
    return stage in (None, CONNECTOR_STAGE)


def set_stage(peft_model, stage: str | None, factors: frozenset[str] = BOTH) -> None:
    """Make only ``stage``'s parameters trainable (``None``: every adapter parameter, i.e. PEFT's default), and of
    the LoRA factors only ``factors`` ("A", "B": lora_aggregation ffa / rolora freeze the other one)."""
    for name, param in peft_model.named_parameters():
        if is_lora_key(name) or ".modules_to_save." in name:
            param.requires_grad_(_trains(name, stage, factors))


def stage_keys(keys, stage: str | None, factors: frozenset[str] = BOTH) -> list[str]:
    """The adapter-state keys a stage's update carries (``None``: all of them), of the LoRA factors ``factors``."""
    return [k for k in keys if _trains(k, stage, factors)]


def apply_strategy(model: nn.Module, strategy: str, lora: LoraSpec, seed: int, rank: int = 0):
    """Wrap ``model`` in a ``PeftModel`` for ``strategy``; the adapter init is a pure function of ``seed``
    (and ``rank``, the site-local LoRA rank, 0 = ``lora.r``: see :func:`lora_config_for`).

    Guarantees: the global torch RNG is seeded with ``seed`` right before the adapters are created (so two sites
    with the same spec start from identical adapters); no vision-tower parameter is trainable (the connector may
    live inside the vision module, as Qwen2-VL's ``visual.merger``, and is not counted as vision tower).
    """
    from peft import get_peft_model

    config = lora_config_for(model, strategy, lora, rank)
    parts = find_parts(model)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 API that warns about its own deprecation; not actionable here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    if parts.vision_tower is not None:
        tower, connectors = f".{parts.vision_tower}.", [f".{c}." for c in parts.connectors]
        leaked = [n for n, p in peft_model.named_parameters()
                  if p.requires_grad and tower in f".{n}" and not any(c in f".{n}" for c in connectors)]
        if leaked:  # pragma: no cover - the regex above makes this impossible; keep the invariant loud
            raise RuntimeError(f"strategy {strategy} would train vision-tower parameters: {leaked[:3]}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("strategy %s: %d trainable parameters", strategy, trainable)
    return peft_model
