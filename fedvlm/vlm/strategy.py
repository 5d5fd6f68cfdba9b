"""Fine-tuning strategies: which parameters of a VLM train, expressed as one PEFT LoRA config.

- F-C:  the connector (vision -> language projector) trains fully; nothing else.
- F-L:  LoRA on the language model's linear layers; nothing else.
- F-CL: both (the default).
- F-2stage (connector first, LoRA after a switch round) needs a switch-round setting the task spec does not carry
  yet, so it is rejected with a clear error.

The vision encoder never trains: LoRA targets are a regex anchored at the language model's module path, because
plain suffixes like ``q_proj`` also match the CLIP vision tower. The connector is carried with ``modules_to_save``;
F-C uses PEFT's "dummy-target-modules" (an adapter with no LoRA layers, only modules to save).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fedvlm.spec import LoraSpec

logger = logging.getLogger(__name__)

# Tried in order; the first module name that exists in the model is used.
LANGUAGE_MODEL_NAMES = ("model.language_model", "language_model", "model.text_model")
CONNECTOR_NAMES = ("model.multi_modal_projector", "multi_modal_projector", "model.visual.merger", "visual.merger")
VISION_TOWER_NAMES = ("model.vision_tower", "vision_tower", "model.visual", "visual")
DUMMY_TARGET_MODULES = "dummy-target-modules"  # peft.utils.constants.DUMMY_TARGET_MODULES


@dataclass(frozen=True)
class ModelParts:
    """Dotted module paths (as in ``model.named_modules()``) of the three parts of an encoder-based VLM."""

    language_model: str
    connector: str
    vision_tower: str | None


def find_parts(model: nn.Module) -> ModelParts:
    """Locate language model, connector and vision tower by name; ``ValueError`` if LM or connector is missing."""
    names = {name for name, _ in model.named_modules()}

    def first(candidates: tuple[str, ...], what: str, required: bool = True) -> str | None:
        for candidate in candidates:
            if candidate in names:
                return candidate
        if required:
            raise ValueError(f"cannot find the {what} in {type(model).__name__} (looked for {', '.join(candidates)})")
        return None

    return ModelParts(
        language_model=first(LANGUAGE_MODEL_NAMES, "language model"),
        connector=first(CONNECTOR_NAMES, "connector"),
        vision_tower=first(VISION_TOWER_NAMES, "vision tower", required=False),
    )


def lora_target_regex(model: nn.Module, parts: ModelParts, targets: tuple[str, ...]) -> str:
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


def lora_config_for(model: nn.Module, strategy: str, lora: LoraSpec):
    """The ``peft.LoraConfig`` that makes exactly the strategy's parameters trainable (see module docstring)."""
    from peft import LoraConfig

    parts = find_parts(model)
    if strategy == "F-2stage":
        raise ValueError("task.strategy: F-2stage is not yet supported (the task spec has no switch round yet)")
    if strategy not in ("F-C", "F-L", "F-CL"):
        raise ValueError(f"task.strategy: unknown strategy {strategy!r} (known: F-C, F-L, F-CL)")
    uses_lora = strategy in ("F-L", "F-CL")
    trains_connector = strategy in ("F-C", "F-CL")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(model, parts, lora.targets) if uses_lora else DUMMY_TARGET_MODULES,
        modules_to_save=[parts.connector] if trains_connector else None,
        bias="none",
    )


def apply_strategy(model: nn.Module, strategy: str, lora: LoraSpec, seed: int):
    """Wrap ``model`` in a ``PeftModel`` for ``strategy``; the adapter init is a pure function of ``seed``.

    Guarantees: the global torch RNG is seeded with ``seed`` right before the adapters are created (so two sites
    with the same spec start from identical adapters); no vision-tower parameter is trainable.
    """
    from peft import get_peft_model

    config = lora_config_for(model, strategy, lora)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers 5 API that warns about its own deprecation; not actionable here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    parts = find_parts(model)
    if parts.vision_tower is not None:
        leaked = [n for n, p in peft_model.named_parameters() if p.requires_grad and f".{parts.vision_tower}." in n]
        if leaked:  # pragma: no cover - the regex above makes this impossible; keep the invariant loud
            raise RuntimeError(f"strategy {strategy} would train vision-tower parameters: {leaked[:3]}")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("strategy %s: %d trainable parameters", strategy, trainable)
    return peft_model
