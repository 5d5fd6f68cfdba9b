"""Read LLaVA-style JSON datasets: a list of records, each with an ``image`` and ``conversations``.

A record looks like::

    {"id": "x1", "image": "images/x1.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat digit is shown?"}, {"from": "gpt", "value": "7"}]}

Image paths are relative to the JSON file's folder and must stay inside it. Everything is checked once, at load,
and a bad record raises ``DataError`` naming the file, the record (index and id) and the field.
"""

from __future__ import annotations

import json
import logging
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
    """One image-question-answer example; ``image`` is an absolute path inside the dataset folder."""

    id: str
    image: Path
    question: str  # the human turn without the ``<image>`` placeholder
    answer: str  # the first assistant turn after it


def load_llava_json(path: Path, check_images: bool = True) -> list[Example]:
    """Load and validate ``path``; with ``check_images`` every image is opened and verified with Pillow.

    Guarantees: every returned example's image exists inside ``path``'s folder (no ``..``, no absolute path,
    no symlink escape) and, if checked, decodes; question and answer are non-empty strings.
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
    root = path.parent.resolve()
    examples = [_parse_record(path, root, index, record, check_images) for index, record in enumerate(raw)]
    logger.debug("loaded %d examples from %s", len(examples), path)
    return examples


def _parse_record(path: Path, root: Path, index: int, record: object, check_images: bool) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{path}: record {index}: expected an object, got {type(record).__name__}")
    record_id = str(record.get("id", index))
    where = f"{path}: record {index} (id {record_id!r})"

    image_field = record.get("image")
    if not isinstance(image_field, str) or not image_field.strip():
        raise DataError(f"{where}: field 'image': missing or not a non-empty string")
    image = _resolve_image(where, root, image_field)
    if check_images:
        _verify_image(where, image_field, image)

    question, answer = _first_exchange(where, record.get("conversations"))
    return Example(id=record_id, image=image, question=question, answer=answer)


def _resolve_image(where: str, root: Path, image_field: str) -> Path:
    posix, windows = PurePosixPath(image_field), PureWindowsPath(image_field)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise DataError(f"{where}: field 'image': absolute path {image_field!r} not allowed (must be relative)")
    if ".." in posix.parts or ".." in windows.parts:
        raise DataError(f"{where}: field 'image': path {image_field!r} escapes the data folder via '..'")
    image = (root / image_field).resolve()
    if not image.is_relative_to(root):
        raise DataError(f"{where}: field 'image': path {image_field!r} resolves outside the data folder {root}")
    if not image.is_file():
        raise DataError(f"{where}: field 'image': file {image_field!r} not found under {root}")
    return image


def _verify_image(where: str, image_field: str, image: Path) -> None:
    from PIL import Image

    try:
        with Image.open(image) as img:
            img.verify()
    except Exception as exc:  # Pillow raises many types for corrupt files
        raise DataError(f"{where}: field 'image': {image_field!r} is not a readable image ({exc})") from None


def _first_exchange(where: str, conversations: object) -> tuple[str, str]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: field 'conversations': missing or not a non-empty list")
    question = None
    for turn_index, turn in enumerate(conversations):
        field = f"conversations[{turn_index}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise DataError(f"{where}: field '{field}': expected an object with 'from' and 'value'")
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{field}.value': missing or not a string")
        role = turn["from"].lower()
        if question is None and role in HUMAN_ROLES:
            question = value.replace(IMAGE_PLACEHOLDER, "").strip()
            if not question:
                raise DataError(f"{where}: field '{field}.value': the human turn has no question text")
        elif question is not None and role in ASSISTANT_ROLES:
            answer = value.strip()
            if not answer:
                raise DataError(f"{where}: field '{field}.value': the gpt turn is empty")
            return question, answer
    if question is None:
        raise DataError(f"{where}: field 'conversations': no human turn")
    raise DataError(f"{where}: field 'conversations': no gpt turn after the human turn")
