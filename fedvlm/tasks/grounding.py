"""Grounding / detection posed as text: the answer is the box of the named object, written as four numbers.

Box convention (``TaskSpec.box_format``, default ``"xyxy-pixel"``): ``[x_min, y_min, x_max, y_max]``, origin at
the image's top-left corner, x to the right, y down, max exclusive, in pixels of the image as stored (built-in
scenes: 32 x 32). ``"xyxy-1000"`` is the same box scaled to integers in [0, 1000] per axis (Qwen-VL style).
IoU does not change when both boxes are scaled by the same per-axis factors, so scoring never needs the image size;
the convention only tells the model and the reader how to write boxes.

Parsing (``parse_box``): the first four numbers in the generated text; a box with ``x_max < x_min`` or
``y_max < y_min`` or fewer than four numbers is unparsable and scores IoU 0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BOX_FORMATS = ("xyxy-pixel", "xyxy-1000")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

Box = tuple[float, float, float, float]


def parse_box(text: str) -> Box | None:
    """The first four numbers of ``text`` as an ``xyxy`` box, or ``None`` if absent or inverted."""
    numbers = [float(m) for m in _NUMBER.findall(text)[:4]]
    if len(numbers) < 4:
        return None
    x0, y0, x1, y1 = numbers
    if x1 < x0 or y1 < y0:
        return None
    return (x0, y0, x1, y1)


def format_box(box: Sequence[float]) -> str:
    """The canonical answer text of a box: ``"[x0, y0, x1, y1]"`` with integers."""
    return "[" + ", ".join(str(round(v)) for v in box) + "]"


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``xyxy`` boxes (0.0 when the union is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``miou`` (mean IoU, unparsable predictions count as 0), ``acc_iou50`` (fraction with IoU >= 0.5),
    ``parse_rate`` and ``num_examples``. ``ValueError`` if a reference is not a box."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    ious, parsed = [], 0
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        ref = parse_box(reference)
        if ref is None:
            raise ValueError(f"reference {i} is not an xyxy box: {reference!r}")
        box = parse_box(prediction)
        parsed += box is not None
        ious.append(box_iou(box, ref) if box is not None else 0.0)
    n = len(references)
    return {
        "miou": sum(ious) / n if n else 0.0,
        "acc_iou50": sum(iou >= 0.5 for iou in ious) / n if n else 0.0,
        "parse_rate": parsed / n if n else 0.0,
        "num_examples": float(n),
    }
