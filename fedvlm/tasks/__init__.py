"""Task types: how a generated answer is parsed and scored.

``get_task(name)`` returns a ``Task`` whose ``score(predictions, references)`` gives a metrics dict that always
contains ``accuracy`` and ``num_examples``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedvlm.tasks import classification


@dataclass(frozen=True)
class Task:
    """A task type's answer parser and scorer."""

    name: str
    parse: Callable[[str], str]
    score: Callable[[Sequence[str], Sequence[str]], dict[str, float]]


TASKS: dict[str, Task] = {
    "classification": Task("classification", classification.parse_answer, classification.exact_match),
}


def get_task(name: str) -> Task:
    """The task registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task.task_type: unknown task type {name!r} (known: {', '.join(sorted(TASKS))})") from None
