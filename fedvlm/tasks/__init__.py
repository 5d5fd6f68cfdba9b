"""Task types: how a generated answer is parsed and scored.

``get_task(name)`` returns a ``Task`` whose ``score(predictions, references)`` gives a metrics dict of floats that
always contains ``num_examples`` and the task's ``primary`` metric:

==================  ===============================================================  ==========
task type           metrics                                                          primary
==================  ===============================================================  ==========
classification      accuracy                                                         accuracy
vqa                 accuracy, accuracy_closed, accuracy_open, num_closed, num_open   accuracy
captioning          bleu_1..bleu_4, rouge_l, cider (CIDEr-D)                         cider
grounding           miou, acc_iou50, parse_rate                                      miou
==================  ===============================================================  ==========

``multitask`` is not a task of its own: each record names its task in a ``task`` field and ``score_mixed`` scores
every task's records with that task, prefixing the keys (``"vqa/accuracy"``, ``"vqa/num_examples"``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedvlm.tasks import captioning, classification, grounding, vqa

MULTITASK = "multitask"


@dataclass(frozen=True)
class Task:
    """A task type's answer parser and scorer, its headline metric and a sensible generation length."""

    name: str
    parse: Callable[[str], object]
    score: Callable[[Sequence[str], Sequence[str]], dict[str, float]]
    primary: str
    max_new_tokens: int  # enough for the built-in datasets' answers with the tiny tokenizer


TASKS: dict[str, Task] = {
    "classification": Task("classification", classification.parse_answer, classification.exact_match,
                           "accuracy", 4),
    "vqa": Task("vqa", vqa.parse_answer, vqa.vqa_accuracy, "accuracy", 4),
    "captioning": Task("captioning", captioning.tokenize_caption, captioning.caption_scores, "cider", 32),
    "grounding": Task("grounding", grounding.parse_box, grounding.grounding_scores, "miou", 20),
}
TASK_TYPES = (*TASKS, MULTITASK)


def get_task(name: str) -> Task:
    """The task registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task.task_type: unknown task type {name!r} (known: {', '.join(sorted(TASKS))})") from None


def score_mixed(tasks: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Score each record with its own task (``tasks[i]``). One task: that task's metrics unchanged. Several: every
    task's metrics prefixed ``"<task>/"`` plus the overall ``num_examples``."""
    if not len(tasks) == len(predictions) == len(references):
        raise ValueError(f"{len(tasks)} tasks, {len(predictions)} predictions, {len(references)} references")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(tasks):
        groups.setdefault(name, []).append(i)
    if len(groups) <= 1:
        name = next(iter(groups), "classification")
        return get_task(name).score(list(predictions), list(references))
    out: dict[str, float] = {}
    for name in sorted(groups):
        idx = groups[name]
        metrics = get_task(name).score([predictions[i] for i in idx], [references[i] for i in idx])
        out.update({f"{name}/{key}": value for key, value in metrics.items()})
    out["num_examples"] = float(len(tasks))
    return out


def primary_metric(metrics: dict[str, float]) -> tuple[str, float] | None:
    """The headline metric of a metrics dict (``accuracy``, else ``cider``, else ``miou``, else the first
    ``*/<primary>`` of a multi-task dict), or ``None``."""
    for key in ("accuracy", "cider", "miou"):
        if key in metrics:
            return key, metrics[key]
    for name, task in TASKS.items():
        key = f"{name}/{task.primary}"
        if key in metrics:
            return key, metrics[key]
    return None
