"""Closed-set classification posed as VQA: the answer is a short label, scored by exact match.

The model's generated text is reduced to a label by ``parse_answer`` (first line, first word, lower case,
surrounding punctuation stripped); references go through ``normalize_answer`` so "7", " 7." and "7\\n" all match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_EDGE_PUNCTUATION = string.punctuation + " \t"


def normalize_answer(text: str) -> str:
    """Lower case, collapse whitespace, strip surrounding whitespace and punctuation."""
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION).lower()


def parse_answer(generated: str) -> str:
    """The label in a generated answer: its first non-empty line's first word, normalized (``""`` if none)."""
    for line in generated.splitlines():
        words = normalize_answer(line).split(" ")
        if words and words[0]:
            return normalize_answer(words[0])
    return ""


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"accuracy", "num_examples"}``: the fraction of parsed predictions equal to the normalized references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = sum(parse_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    n = len(references)
    return {"accuracy": hits / n if n else 0.0, "num_examples": float(n)}
