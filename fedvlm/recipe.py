"""What the site-GPU recipe keys of a task spec mean at run time (docs/models.md, "site-GPU recipe").

The learning rate at a local step, the compute dtype of a precision, the autocast region, and whether this site can
train the recipe at all, checked before any model is loaded. The spec itself (fedvlm.spec) validates the values;
this module knows about devices and optional packages, which the coordinator never needs.
"""

from __future__ import annotations

import math

import torch

from fedvlm.spec import TaskSpec, TrainSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SiteSetupError(ValueError):
    """This site cannot train the run's recipe (fp16 without a GPU, quantization without bitsandbytes, ...); the
    message is one line that says what to change."""


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype forward passes compute in for ``task.train.precision`` (float32, bfloat16 or float16)."""
    return _DTYPES[precision]


def autocast(precision: str, device: torch.device | str):
    """The autocast region of a forward pass: a disabled one for fp32, else ``torch.autocast`` in the precision's
    dtype on the device's type. Parameters keep their dtypes; only the ops' inputs are cast."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=compute_dtype(precision), enabled=precision != "fp32")


def learning_rate(train: TrainSpec, round_index: int, total_rounds: int, step: int, steps_per_round: int) -> float:
    """The learning rate of local step ``step`` (1-based) of round ``round_index`` (1-based) of a run of
    ``total_rounds`` rounds, on a site that takes ``steps_per_round`` steps a round.

    A pure function of those numbers, so a site needs no state from earlier rounds (it builds a fresh optimizer
    every round). The schedule runs over the site's whole run, ``t = (round - 1) * steps_per_round + step - 1`` of
    ``T = total_rounds * steps_per_round`` steps: a linear warm-up ``lr * (t + 1) / (warmup_steps + 1)`` over the
    first ``warmup_steps``, then ``lr`` (constant) or ``lr * (1 + cos(pi * (t - warmup) / (T - warmup))) / 2``
    (cosine), as transformers' ``get_cosine_schedule_with_warmup`` shifted by one step so that no step trains at
    a rate of zero. ``ValueError`` if the
    schedule needs a position the arguments do not give (a round outside 1..total_rounds).
    """
    if train.lr_schedule == "constant" and not train.warmup_steps:
        return train.lr
    if round_index < 1 or (train.lr_schedule == "cosine" and not 1 <= round_index <= total_rounds):
        raise ValueError(f"task.train.lr_schedule {train.lr_schedule} with warmup_steps {train.warmup_steps}: round "
                         f"{round_index} is outside the run's rounds 1..{total_rounds}")
    t = (round_index - 1) * steps_per_round + step - 1
    if t < train.warmup_steps:
        return train.lr * (t + 1) / (train.warmup_steps + 1)
    if train.lr_schedule == "constant":
        return train.lr
    decay_steps = max(1, total_rounds * steps_per_round - train.warmup_steps)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - train.warmup_steps) / decay_steps)))


def check_site(spec: TaskSpec, device: str) -> None:
    """``SiteSetupError`` (one line) if this site cannot train ``spec`` on ``device``: fp16 without a CUDA GPU, bf16
    on a GPU without bf16, quantization without bitsandbytes installed. Nothing is loaded before it is called."""
    kind = torch.device(device).type
    precision = spec.train.precision
    if precision == "fp16" and kind != "cuda":
        raise SiteSetupError(f'task.train.precision = "fp16" needs a CUDA GPU and this site trains on {device}: '
                             'use "bf16" or "fp32" for runs with CPU sites')
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise SiteSetupError(f'task.train.precision = "bf16": the GPU {torch.cuda.get_device_name(device)} has no '
                             'bfloat16 support: use "fp16" or "fp32"')
    if spec.quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise SiteSetupError(f'task.quantization = "{spec.quantization}" needs bitsandbytes on this site: '
                                 "pip install 'fedvlm[qlora]'") from exc
