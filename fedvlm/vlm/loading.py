"""Load a base VLM and its processor through the standard Hugging Face ``from_pretrained`` path."""

from __future__ import annotations

import logging
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


def load_base(spec_model: str, cache_dir: Path | None = None, device: str = "cpu"):
    """Return ``(model, processor)`` for a preset name or ``hf:<id or path>``, the model in eval mode on ``device``.

    Both kinds go through ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained``; with
    ``HF_HUB_OFFLINE=1`` a hub id must already be in the local Hugging Face cache. Weights load as float32.
    ``device`` may be ``"auto"`` (see ``resolve_device``).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec_model, cache_dir)
    hf_logging.disable_progress_bar()  # clients draw their own progress; tqdm bars from 3 processes are noise
    logger.info("loading base model %s from %s", spec_model, path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; many causal LMs ship none
    model.to(resolve_device(device))
    model.eval()
    return model, processor
