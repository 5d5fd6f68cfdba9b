"""The local training loop of one round on one site, and greedy evaluation.

Read it top to bottom: build a batch schedule from a seeded shuffle, make a fresh AdamW over the trainable
parameters (clients are stateless between rounds), then step through the schedule. An optimizer step takes an
effective batch of ``batch_size * grad_accum_steps`` examples: this process's share of it (all of it, or one of
``--nproc`` shards) in forward passes of at most ``batch_size``, each under the precision's autocast, their
gradients summed (and summed over the processes). No callbacks beyond an optional ``progress(step, total_steps)``
and the algorithm's hook.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedvlm.algorithms.base import ClientHook
from fedvlm.data.collate import IGNORE_INDEX, BatchBuilder
from fedvlm.data.llava_json import Example
from fedvlm.data_parallel import SINGLE_PROCESS, DataParallel
from fedvlm.recipe import autocast, learning_rate
from fedvlm.spec import TrainSpec

logger = logging.getLogger(__name__)

GRAD_CLIP_NORM = 1.0


@dataclass(frozen=True)
class TrainResult:
    """What one local round did. ``loss_first``/``loss_last`` average the first/last few steps (see train_local)."""

    num_examples: int
    steps: int
    loss_first: float
    loss_last: float
    seconds: float


def batch_schedule(
    num_examples: int, batch_size: int, local_epochs: float, max_steps: int, generator: torch.Generator
) -> list[list[int]]:
    """Example indices per optimizer step: ``ceil(local_epochs * ceil(n / batch_size))`` steps, capped by
    ``max_steps`` (0 = no cap); each epoch is a fresh permutation drawn from ``generator``; the last batch of an
    epoch may be smaller."""
    if num_examples == 0:
        return []
    steps_per_epoch = math.ceil(num_examples / batch_size)
    total = math.ceil(local_epochs * steps_per_epoch)
    if max_steps:
        total = min(total, max_steps)
    schedule: list[list[int]] = []
    while len(schedule) < total:
        order = torch.randperm(num_examples, generator=generator).tolist()
        for start in range(0, num_examples, batch_size):
            schedule.append(order[start : start + batch_size])
            if len(schedule) == total:
                break
    return schedule


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of ``batch`` on ``device`` (whatever its keys: each model family has its own inputs); floating
    inputs keep their dtype, the autocast region casts them where an op needs it."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The positions that carry a loss: labels other than IGNORE_INDEX after the causal shift by one (what the
    Hugging Face causal-LM loss averages over)."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def train_local(
    model: torch.nn.Module,
    batches: BatchBuilder,
    examples: Sequence[Example],
    train: TrainSpec,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    hook: ClientHook | None = None,
    round_index: int = 1,
    total_rounds: int = 1,
    group: DataParallel = SINGLE_PROCESS,
) -> TrainResult:
    """Train ``model``'s trainable parameters in place on ``examples`` for round ``round_index`` of
    ``total_rounds`` (the learning-rate schedule's position, fedvlm.recipe.learning_rate).

    Guarantees: reproducible for a given ``seed`` (shuffle and dropout both derive from it); a fresh AdamW;
    the loss of a step is the mean over every answer token of its effective batch, however it is split into
    forward passes and processes (``num_items_in_batch`` of the Hugging Face loss), so ``grad_accum_steps`` and
    ``group`` change memory and speed, not the result (up to float rounding; dropout masks differ per process);
    ``hook`` (fedvlm.algorithms) adds ``hook.loss_term()`` to the loss once per step and runs
    ``hook.after_backward()`` on the step's summed, unscaled gradient before clipping (the reported losses exclude
    the hook's term); gradients clipped to norm 1; fp16 scales the loss (``torch.amp.GradScaler``) and skips the
    steps whose gradients overflow; ``progress(step, total)`` after every step (step counts from 1); the model is
    left in eval mode. ``loss_first``/``loss_last`` are the mean loss of the first/last ``k`` steps,
    ``k = max(1, min(10, steps // 4))``, so they are comparable without being single noisy batches. Every process
    of ``group`` must call it with the same arguments.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    effective_batch = train.batch_size * train.grad_accum_steps
    schedule = batch_schedule(len(examples), effective_batch, train.local_epochs, train.max_steps, generator)
    rates = [learning_rate(train, round_index, total_rounds, step, len(schedule))
             for step in range(1, len(schedule) + 1)]  # before anything changes: a bad position is a ValueError
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type) if train.precision == "fp16" else None
    torch.manual_seed(seed + group.rank)  # dropout masks

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    model.train()
    losses: list[float] = []
    for step, (indices, rate) in enumerate(zip(schedule, rates, strict=True), start=1):
        for param_group in optimizer.param_groups:
            param_group["lr"] = rate
        mine = group.shard(indices)
        # The one place a step's batches are made: one per forward pass, from this process's share.
        passes = [batches.training([examples[i] for i in mine[start : start + train.batch_size]])
                  for start in range(0, len(mine), train.batch_size)]
        tokens = group.sum_scalar(float(sum(loss_tokens(b) for b in passes)), device)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for batch in passes:
            with autocast(train.precision, device):
                loss = model(**to_device(batch, device), num_items_in_batch=max(int(tokens), 1)).loss
            backward(loss)
            step_loss += loss.item()
        group.sum_gradients(params)
        extra = hook.loss_term() if hook is not None else None  # e.g. FedProx's proximal term
        if extra is not None:
            backward(extra)
        finite = True
        if scaler is not None:
            scaler.unscale_(optimizer)
            finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        if hook is not None and finite:
            hook.after_backward()  # e.g. SCAFFOLD's control-variate correction
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the unscaled gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        losses.append(group.sum_scalar(step_loss, device))
        if progress is not None:
            progress(step, len(schedule))
    model.eval()

    k = max(1, min(10, len(losses) // 4))
    nan = float("nan")
    result = TrainResult(
        num_examples=len(examples),
        steps=len(losses),
        loss_first=sum(losses[:k]) / k if losses else nan,
        loss_last=sum(losses[-k:]) / k if losses else nan,
        seconds=time.perf_counter() - started,
    )
    logger.info("local round: %d steps, loss %.4f -> %.4f, %.1fs", result.steps, result.loss_first,
                result.loss_last, result.seconds)
    return result


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, batches: BatchBuilder, examples: Sequence[Example], batch_size: int, max_new_tokens: int,
    precision: str = "fp32",
) -> list[str]:
    """Greedy answers (decoded text of the new tokens only, special tokens dropped), one per example, in order;
    generation stops at any of the model's stop tokens and runs under the precision's autocast (a bf16/fp16 base
    needs it for float32 inputs)."""
    model.eval()
    device = next(model.parameters()).device
    encoder = batches.encoder
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = to_device(batches.generation(list(examples[start : start + batch_size])), device)
        with autocast(precision, device):
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=encoder.stop_ids,
                pad_token_id=encoder.pad_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        answers.extend(encoder.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return answers
