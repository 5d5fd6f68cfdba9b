"""Load a base VLM and its processor through the standard Hugging Face ``from_pretrained`` path.

A ``TaskSpec.model`` names a built-in preset, ``hf:<local directory>`` or ``hf:<hub id>[@<revision>]``. A hub id is
first made a local snapshot in the Hugging Face cache (``huggingface_hub.snapshot_download``: the revision pinned to
the commit it resolves to, progress shown), and the model then loads from that directory with no network access.
The reachability probe has a short timeout and huggingface_hub's retries never start: a site whose hub is
unreachable and whose cache lacks the model fails at once with what to do, instead of retrying for about a minute
per file (what ``from_pretrained`` on a hub id does: 5 retries with backoff on every file it asks for).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
# How long the hub may take to answer the first request before the site falls back to its cache.
HUB_PROBE_TIMEOUT_S = 3.0
# The files a model and its processor load from (safetensors only: no pickled weights, no remote code).
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
PROGRESS_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from: ``name`` as an adapter config records it (the hub id, or the local
    directory), the pinned ``revision`` (a commit hash for hub ids, None for directories) and the local
    ``directory`` holding its files (a preset's directory, the given directory or the hub snapshot)."""

    name: str
    revision: str | None
    directory: Path


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else is returned as is."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value, read at call time (the
    Hugging Face libraries read it once at import, so a later change would otherwise be ignored)."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from ``HF_HUB_CACHE`` or ``HF_HOME`` read at call time (as ``offline_mode``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model(spec_model: str, cache_dir: Path | None = None) -> ModelSource:
    """The local files of a ``TaskSpec.model`` value, fetching a hub id's snapshot if needed.

    A preset becomes its (built on demand) directory; ``hf:<directory>`` is that directory; ``hf:<id>@<revision>``
    (a branch, tag or commit) and ``hf:<id>`` (the default branch) are resolved to a commit and downloaded into the
    Hugging Face cache unless already there. ``OSError`` (one line, with what to do) when the files cannot be had;
    ``ValueError`` for a malformed value.
    """
    if not spec_model.startswith(HF_PREFIX):
        from fedvlm.vlm.presets import preset_dir

        directory = preset_dir(spec_model, cache_dir)
        return ModelSource(str(directory), None, directory)
    target = spec_model[len(HF_PREFIX):]
    if not target:
        raise ValueError("task.model: 'hf:' needs a hub id or a local path after it")
    if Path(target).is_dir():
        return ModelSource(target, None, Path(target))
    repo_id, at, revision = target.rpartition("@") if "@" in target else (target, "", "")
    if at and not revision:
        raise ValueError(f"task.model: {spec_model!r}: nothing after '@' (expected hf:<hub id>@<revision>)")
    if Path(repo_id).is_dir():
        raise ValueError(f"task.model: {spec_model!r}: a revision pins hub ids only; hf:{repo_id} loads the "
                         "directory as it is")
    if Path(repo_id).is_absolute():
        raise OSError(f"task.model: {spec_model!r}: no such directory")
    commit, directory = _hub_snapshot(spec_model, repo_id, revision or None)
    return ModelSource(repo_id, commit, directory)


def _hub_snapshot(spec_model: str, repo_id: str, revision: str | None) -> tuple[str, Path]:
    """(commit, snapshot directory) of ``repo_id`` at ``revision``: downloaded when the hub answers, else the cached
    snapshot of that revision; ``OSError`` with a hint when neither."""
    from huggingface_hub import HfApi, snapshot_download

    cache = hub_cache_dir()
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read at call time, like HF_HUB_OFFLINE
    wanted = f"{repo_id}@{revision}" if revision else repo_id
    if offline_mode():
        reason = "HF_HUB_OFFLINE is set: a hub id must already be in the local Hugging Face cache"
    else:
        try:
            info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, timeout=HUB_PROBE_TIMEOUT_S)
        except Exception as exc:  # unreachable, timed out, not found, gated: the cache may still hold it
            reason = f"the hub did not serve {wanted} ({type(exc).__name__}: {_first_line(exc)})"
        else:
            logger.info("downloading %s (commit %s) into %s", wanted, info.sha, cache)
            started = time.monotonic()
            # By name, not by info.sha: the cache then records the branch or tag, so it resolves offline later.
            path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, endpoint=endpoint,
                                          allow_patterns=MODEL_FILES, tqdm_class=_progress_class()))
            logger.info("%s ready in %.1fs: %s", wanted, time.monotonic() - started, path)
            return path.name, path  # the snapshot folder is named by its commit
    try:
        path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                      allow_patterns=MODEL_FILES))
    except Exception as exc:  # LocalEntryNotFoundError, an incomplete snapshot, a malformed id
        raise OSError(
            f"task.model: cannot load {spec_model!r}: {reason}, and the Hugging Face cache {cache} has no complete "
            f"snapshot of it ({type(exc).__name__}). Download it once where the hub is reachable "
            f"(`hf download {repo_id}{f' --revision {revision}' if revision else ''}`) and point HF_HOME at that "
            "cache, or use hf:<local directory>") from exc
    logger.warning("%s; using the cached snapshot %s", reason, path)
    return path.name, path


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _progress_class() -> type[tqdm]:
    """Download progress: bars on a terminal, else periodic log lines (a container's log is not a terminal)."""
    from huggingface_hub import constants

    if sys.stderr.isatty() and not constants.HF_HUB_DISABLE_PROGRESS_BARS:
        return tqdm
    return LoggedProgress


class LoggedProgress(tqdm):
    """A tqdm that logs ``desc: done / total (percent)`` at most every ``PROGRESS_LOG_INTERVAL_S`` and once done,
    instead of drawing a bar."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.pop("name", None)  # huggingface_hub's own bars take a name; tqdm does not
        kwargs.update(disable=False, mininterval=PROGRESS_LOG_INTERVAL_S, file=io.StringIO())
        self._logged = (0.0, 0)  # when, at which count
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        now, (logged_at, logged_n) = time.monotonic(), self._logged
        done = bool(self.total) and self.n >= self.total
        if self.n != logged_n and (done or now - logged_at >= PROGRESS_LOG_INTERVAL_S):
            self._logged = (now, self.n)
            logger.info("%s", self.status())
        return True

    def status(self) -> str:
        """``desc: done / total (percent)``, bytes scaled as in ``1.95MB``."""
        unit = "" if self.unit == "it" else self.unit
        scale = self.format_sizeof if self.unit_scale else str
        done, total = scale(self.n), scale(self.total) if self.total else "?"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{(self.desc or 'progress').rstrip(': ')}: {done}{unit} / {total}{unit}{percent}"


def _full_precision_modules(directory: Path) -> list[str]:
    """What quantization leaves alone: the connector (it trains, in float32) and the output head (transformers'
    own default, which an explicit skip list replaces)."""
    from transformers import AutoConfig

    from fedvlm.vlm.families import FAMILIES

    family = FAMILIES.get(AutoConfig.from_pretrained(directory, local_files_only=True).model_type)
    return ["lm_head"] + (list(family.connectors) if family is not None else [])


def quantization_config(quantization: str, directory: Path, compute_dtype):
    """The ``BitsAndBytesConfig`` of ``task.quantization`` (None for "none"): nf4 with double quantization and
    ``compute_dtype`` (QLoRA's recipe), or LLM.int8; the connector and the head are not quantized."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = _full_precision_modules(directory)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def load_base(spec_model: str | ModelSource, cache_dir: Path | None = None, device: str = "cpu",
              precision: str = "fp32", quantization: str = "none"):
    """Return ``(model, processor)`` for a preset name, ``hf:<dir>``, ``hf:<id>[@<revision>]`` or a resolved
    ``ModelSource``, the model in eval mode on ``device`` (``"auto"``: see ``resolve_device``).

    All kinds load from a local directory through ``AutoModelForImageTextToText`` / ``AutoProcessor`` (see
    ``resolve_model`` for hub ids). Weights load as float32, or in the ``precision``'s dtype for bf16/fp16 (the
    frozen base then takes half the memory); ``quantization`` nf4/int8 quantizes the base with bitsandbytes at
    load (``quantization_config``), placed on ``device`` by ``device_map``.
    """
    source = spec_model if isinstance(spec_model, ModelSource) else resolve_model(spec_model, cache_dir)
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    import fedvlm.vlm.archs  # noqa: F401  (registers fedvlm's own model type with the Auto classes)
    from fedvlm.recipe import compute_dtype
    from fedvlm.vlm.families import family_of
    from fedvlm.vlm.processors import load_processor

    hf_logging.disable_progress_bar()  # loading from local disk: per-weight bars from 3 processes are noise
    device = resolve_device(device)
    dtype = compute_dtype(precision)
    quantized = quantization_config(quantization, source.directory, dtype)
    logger.info("loading base model %s from %s (%s%s)", source.name, source.directory, precision,
                f", {quantization}" if quantized else "")
    extra = {"quantization_config": quantized, "device_map": {"": device}} if quantized else {}
    try:
        # The family and the processor first: an unknown family or a processor that cannot run here fails at once,
        # before the weights are read.
        family_of(AutoConfig.from_pretrained(source.directory, local_files_only=True).model_type, source.name)
        processor = load_processor(source.directory, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(
            source.directory, dtype=torch.float32 if quantized else dtype, local_files_only=True, **extra)
    except OSError as exc:
        raise OSError(f"task.model: cannot load {source.name!r} from {source.directory}: {exc}") from exc
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token; many causal LMs ship none
    if not quantized:  # a quantized model is placed at load and refuses .to()
        model.to(device)
    model.eval()
    return model, processor
