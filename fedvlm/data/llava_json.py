"""Read LLaVA-style JSON datasets: a list of records, each with an ``image`` and ``conversations``.

A record looks like::

    {"id": "x1", "image": "images/x1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat digit is shown?"}, {"from": "gpt", "value": "7"}]}

``image`` may also be a list of paths (several images per example): each ``<image>`` placeholder of the human turns
places the next image in that turn; with no placeholders every image is shown in the first turn.

Image paths are relative to an image root and must stay inside it: the JSON file's folder by default, or the
``image_root`` given to ``load_llava_json`` (the FedVLMBench release root, see ``fedvlm.data.sources``).
Every human/assistant pair of a multi-turn conversation becomes a turn (all of them are trained on; evaluation asks
the first one). An optional ``task`` field (one of ``fedvlm.tasks.TASKS``) names the record's task in multi-task data.
Everything is checked once, at load, and a bad record raises ``DataError`` naming the file, the record (index and
id) and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class DataError(ValueError):
    """A dataset file or record is malformed; the message names the file, the record and the field."""


@dataclass(frozen=True)
class Example:
    """One image-question-answer example; ``image`` (and ``more_images``) are absolute paths inside the dataset
    folder."""

    id: str
    image: Path
    question: str  # the human turn without the ``<image>`` placeholder
    answer: str  # the first assistant turn after it
    # Every (human, assistant) pair in order, the first being (question, answer); () means just that one.
    turns: tuple[tuple[str, str], ...] = ()
    task: str | None = None  # the record's ``task`` field, if any
    more_images: tuple[Path, ...] = ()  # the record's further images, in order
    # The exchange each image belongs to (one entry per image of ``images``); () means all in the first.
    turn_of_image: tuple[int, ...] = ()

    @property
    def exchanges(self) -> tuple[tuple[str, str], ...]:
        """All (question, answer) pairs of the conversation, in order (at least the first)."""
        return self.turns or ((self.question, self.answer),)

    @property
    def images(self) -> tuple[Path, ...]:
        """Every image of the record, in order (at least one)."""
        return (self.image, *self.more_images)

    @property
    def image_turns(self) -> tuple[int, ...]:
        """For each of ``images``, the index of the exchange whose user turn shows it."""
        return self.turn_of_image or (0,) * len(self.images)


def load_llava_json(
    path: Path, check_images: bool = True, image_root: Path | Sequence[Path] | None = None
) -> list[Example]:
    """Load and validate ``path``; with ``check_images`` every image is opened and verified with Pillow.

    Guarantees: every returned example's image exists inside the image root (``path``'s folder unless
    ``image_root`` is given; a sequence of roots is tried in order and the first holding the file wins; no ``..``,
    no absolute path, no symlink escape) and, if checked, decodes; every
    question and answer is a non-empty string; ``task``, when present, is a known task type.
    Raises ``DataError`` on the first problem.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
    if image_root is None:
        roots = (path.parent.resolve(),)
    elif isinstance(image_root, (str, Path)):
        roots = (Path(image_root).resolve(),)
    else:
        roots = tuple(Path(r).resolve() for r in image_root)
    examples = [_parse_record(path, roots, index, record, check_images) for index, record in enumerate(raw)]
    logger.debug("loaded %d examples from %s", len(examples), path)
    return examples


def _parse_record(path: Path, roots: tuple[Path, ...], index: int, record: object, check_images: bool) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index}: expected an object, got {type(record).__name__}")
    record_id = str(record.get("id", index))
    where = f"{path}: record {index} (id {record_id!r})"

    image_field = record.get("image")
    fields = image_field if isinstance(image_field, list) and image_field else [image_field]
    if not all(isinstance(f, str) and f.strip() for f in fields):
        raise DataError(f"{where}: field 'image': missing, or not a non-empty string or list of strings")
    images = [_resolve_image(where, roots, f) for f in fields]
    if check_images:
        for field, image in zip(fields, images, strict=True):
            _verify_image(where, field, image)

    turns = _exchanges(where, record.get("conversations"))
    turn_of_image = _image_turns(where, record["conversations"], len(images), len(turns))
    task = record.get("task")
    if task is not None:
        from fedvlm.tasks import TASKS

        if task not in TASKS:
            raise DataError(f"{where}: field 'task': unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
    (question, answer) = turns[0]
    return Example(id=record_id, image=images[0], question=question, answer=answer,
                   turns=turns if len(turns) > 1 else (), task=task, more_images=tuple(images[1:]),
                   turn_of_image=turn_of_image)


def _image_turns(where: str, conversations: list, count: int, exchanges: int) -> tuple[int, ...]:
    """The exchange of each image: the human turn holding its ``<image>`` placeholder, in order; with no placeholders
    every image belongs to the first exchange. () when that is the case anyway."""
    humans = [t["value"] for t in conversations if t["from"].lower() in HUMAN_ROLES]
    per_turn = [value.count(IMAGE_PLACEHOLDER) for value in humans[:exchanges]]
    placed = sum(per_turn)
    if placed == 0 or (count == 1 and placed == 1 and per_turn[0] == 1):
        return ()
    if placed != count:
        raise DataError(f"{where}: field 'conversations': {placed} {IMAGE_PLACEHOLDER} placeholders for {count} "
                        "images (put one per image, or none to show every image in the first turn)")
    return tuple(turn for turn, n in enumerate(per_turn) for _ in range(n))


def _resolve_image(where: str, roots: tuple[Path, ...], image_field: str) -> Path:
    posix, windows = PurePosixPath(image_field), PureWindowsPath(image_field)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise DataError(f"{where}: field 'image': absolute path {image_field!r} not allowed (must be relative)")
    if ".." in posix.parts or ".." in windows.parts:
        raise DataError(f"{where}: field 'image': path {image_field!r} escapes the data folder via '..'")
    for root in roots:
        image = (root / image_field).resolve()
        if not image.is_relative_to(root):
            raise DataError(f"{where}: field 'image': path {image_field!r} resolves outside the data folder {root}")
        if image.is_file():
            return image
    where_looked = " or ".join(str(r) for r in roots)
    raise DataError(f"{where}: field 'image': file {image_field!r} not found under {where_looked}")


def _verify_image(where: str, image_field: str, image: Path) -> None:
    from PIL import Image

    try:
        with Image.open(image) as img:
            img.verify()
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise DataError(f"{where}: field 'image': {image_field!r} is not a readable image ({exc})") from None


def _exchanges(where: str, conversations: object) -> tuple[tuple[str, str], ...]:
    """Every (human, assistant) pair; a human turn must be answered before the next one; system turns skipped."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: field 'conversations': missing or not a non-empty list")
    pairs: list[tuple[str, str]] = []
    question = None
    for turn_index, turn in enumerate(conversations):
        field = f"conversations[{turn_index}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise DataError(f"{where}: field '{field}': expected an object with 'from' and 'value'")
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{field}.value': missing or not a string")
        role = turn["from"].lower()
        if role in HUMAN_ROLES:
            if question is not None:
                raise DataError(f"{where}: field '{field}': two human turns in a row (no gpt turn between them)")
            question = value.replace(IMAGE_PLACEHOLDER, "").strip()
            if not question:
                raise DataError(f"{where}: field '{field}.value': the human turn has no question text")
        elif role in ASSISTANT_ROLES and question is not None:
            answer = value.strip()
            if not answer:
                raise DataError(f"{where}: field '{field}.value': the gpt turn is empty")
            pairs.append((question, answer))
            question = None
    if not pairs:
        if question is None:
            raise DataError(f"{where}: field 'conversations': no human turn")
        raise DataError(f"{where}: field 'conversations': no gpt turn after the human turn")
    return tuple(pairs)
