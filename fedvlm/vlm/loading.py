"""Load a base VLM and its processor through the standard Hugging Face ``from_pretrained`` path."""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"


def resolve_model_path(spec_model: str, cache_dir: Path | None = None) -> str:
    """Map a ``TaskSpec.model`` value to what ``from_pretrained`` takes.

    A built-in preset name becomes its (built on demand) local directory; ``hf:<id or path>`` becomes ``<id or path>``.
    Raises ``ValueError`` for anything else.
    """
    if spec_model.startswith(HF_PREFIX):
        target = spec_model[len(HF_PREFIX):]
        if not target:
            raise ValueError("task.model: 'hf:' needs a hub id or a local path after it")
        return target
    from fedvlm.vlm.presets import preset_dir

    return str(preset_dir(spec_model, cache_dir))


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value, read at call time (the
    Hugging Face libraries read it once at import, so a later change would otherwise be ignored)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_base(spec_model: str, cache_dir: Path | None = None, device: str = "cpu"):
    """Return ``(model, processor)`` for a preset name or ``hf:<id or path>``, the model in eval mode on ``device``.

    Both kinds go through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``; with
    ``HF_HUB_OFFLINE=1`` a hub id must already be in the local Hugging Face cache. Weights load as float32.
    ``device`` may be ``"auto"`` (see ``resolve_device``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    import fedvlm.vlm.archs  # noqa: F401  (registers fedvlm's own model type with the Auto classes)
    from fedvlm.vlm.families import family_of
    from fedvlm.vlm.processors import load_processor

    path = resolve_model_path(spec_model, cache_dir)
    hf_logging.disable_progress_bar()  # clients draw their own progress; tqdm bars from 3 processes are noise
    logger.info("loading base model %s from %s", spec_model, path)
    local_only = offline_mode()
    if Path(path).is_absolute() and not Path(path).is_dir():
        raise OSError(f"task.model: {spec_model!r}: no such directory")
    if local_only and not Path(path).is_dir():
        # Resolve the hub id to its cached snapshot first: from_pretrained still probes the hub for an
        # adapter_config.json (with retries) even with local_files_only=True.
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(path, local_files_only=True)
        except Exception as exc:  # LocalEntryNotFoundError, or a malformed id
            raise OSError(f"task.model: cannot load {spec_model!r} (HF_HUB_OFFLINE is set: a hub id must already "
                          f"be in the local Hugging Face cache): {exc}") from exc
    try:
        # The family and the processor first: an unknown family or a processor that cannot run here fails at once,
        # before the weights are read (or downloaded).
        family_of(AutoConfig.from_pretrained(path, local_files_only=local_only).model_type, spec_model)
        processor = load_processor(path, local_files_only=local_only)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=local_only)
    except OSError as exc:
        hint = " (HF_HUB_OFFLINE is set: a hub id must already be in the local Hugging Face cache)"
        hint = hint if local_only else ""
        raise OSError(f"task.model: cannot load {spec_model!r}{hint}: {exc}") from exc
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; many causal LMs ship none
    model.to(resolve_device(device))
    model.eval()
    return model, processor
