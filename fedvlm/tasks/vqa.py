"""Visual question answering: accuracy after answer normalisation, split into closed (yes/no) and open questions.

Normalisation (``normalize_vqa``), in this order, after the official VQA evaluation's spirit:
lower case; a ``,`` between digits removed ("1,000" == "1000", as the official evaluation's processPunctuation
does); other punctuation removed (a ``.`` between digits is kept, so "3.5" survives);
number words ``zero``..``ten`` become digits; the articles ``a``, ``an``, ``the`` are dropped; whitespace collapsed.
A prediction is parsed from the generated text's first non-empty line (``parse_answer``). A question is *closed*
when its normalised reference is ``yes`` or ``no``, *open* otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
ARTICLES = frozenset({"a", "an", "the"})
CLOSED_ANSWERS = frozenset({"yes", "no"})
_PUNCT = re.compile(r"(?<!\d)[.,](?!\d)|[!\"#$%&'()*+\-/:;<=>?@\[\\\]^_`{|}~]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


def normalize_vqa(text: str) -> str:
    """The normalised form of an answer (see the module docstring); ``""`` for an empty answer."""
    text = _PUNCT.sub(" ", _DIGIT_COMMA.sub("", text.lower()))
    words = [NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def parse_answer(generated: str) -> str:
    """The normalised first non-empty line of a generated answer (``""`` if there is none)."""
    for line in generated.splitlines():
        answer = normalize_vqa(line)
        if answer:
            return answer
    return ""


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``accuracy`` (all), ``accuracy_closed`` / ``accuracy_open`` (0.0 when there are none of that kind, see
    ``num_closed``/``num_open``) and ``num_examples``: exact match of normalised answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    hits = {"closed": 0, "open": 0}
    counts = {"closed": 0, "open": 0}
    for prediction, reference in zip(predictions, references, strict=True):
        ref = normalize_vqa(reference)
        kind = "closed" if ref in CLOSED_ANSWERS else "open"
        counts[kind] += 1
        hits[kind] += parse_answer(prediction) == ref
    n = len(references)
    return {
        "accuracy": (hits["closed"] + hits["open"]) / n if n else 0.0,
        "accuracy_closed": hits["closed"] / counts["closed"] if counts["closed"] else 0.0,
        "accuracy_open": hits["open"] / counts["open"] if counts["open"] else 0.0,
        "num_closed": float(counts["closed"]),
        "num_open": float(counts["open"]),
        "num_examples": float(n),
    }
