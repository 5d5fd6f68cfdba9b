"""The local training loop of one round on one site, and greedy evaluation.

Read it top to bottom: build a batch schedule from a seeded shuffle, make a fresh AdamW over the trainable
parameters (clients are stateless between rounds), then step through the schedule. No callbacks beyond an
optional ``progress(step, total_steps)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedvlm.algorithms.base import ClientHook
from fedvlm.data.collate import BatchBuilder
from fedvlm.data.llava_json import Example
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


def train_local(
    model: torch.nn.Module,
    batches: BatchBuilder,
    examples: Sequence[Example],
    train: TrainSpec,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    hook: ClientHook | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters in place on ``examples`` for one round.

    Guarantees: reproducible for a given ``seed`` (shuffle and dropout both derive from it); a fresh AdamW;
    ``hook`` (fedvlm.algorithms) adds ``hook.loss_term()`` to the loss and runs ``hook.after_backward()`` before
    clipping (the reported losses exclude the hook's term);
    gradients clipped to norm 1; ``progress(step, total)`` after every step (step counts from 1); the model is
    left in eval mode. ``loss_first``/``loss_last`` are the mean loss of the first/last ``k`` steps,
    ``k = max(1, min(10, steps // 4))``, so they are comparable without being single noisy batches.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    schedule = batch_schedule(len(examples), train.batch_size, train.local_epochs, train.max_steps, generator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # dropout masks

    model.train()
    losses: list[float] = []
    for step, indices in enumerate(schedule, start=1):
        batch = batches.training([examples[i] for i in indices])
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        extra = hook.loss_term() if hook is not None else None  # e.g. FedProx's proximal term
        optimizer.zero_grad(set_to_none=True)
        (loss if extra is None else loss + extra).backward()
        if hook is not None:
            hook.after_backward()  # e.g. SCAFFOLD's control-variate correction
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP_NORM)
        optimizer.step()
        losses.append(loss.item())
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
    model: torch.nn.Module, batches: BatchBuilder, examples: Sequence[Example], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers (decoded text of the new tokens only, special tokens dropped), one per example, in order;
    generation stops at any of the model's stop tokens."""
    model.eval()
    device = next(model.parameters()).device
    encoder = batches.encoder
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = batches.generation(list(examples[start : start + batch_size]))
        batch = {k: v.to(device) for k, v in batch.items()}
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
