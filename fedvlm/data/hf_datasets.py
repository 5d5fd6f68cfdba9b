"""Read a Hugging Face ``datasets`` directory (written by ``save_to_disk``) as site data.

Optional: needs ``pip install 'fedvlm[hf]'`` (the ``datasets`` package); imported only when such a directory is
used. Accepted: a ``DatasetDict`` directory (``dataset_dict.json``; splits ``train`` and optionally ``test``) or a
single ``Dataset`` directory (``state.json``; used as the train split). Columns:

- image: the first of ``image``, ``images``, ``img`` -- an ``Image`` feature (decoded to PIL), raw bytes, or a
  ``{"bytes": ..}`` dict (a list takes its first element);
- conversation: ``conversations`` (LLaVA: ``from``/``value``) or ``messages`` (``role``/``content``, where content is a
  string or a list of ``{"type": "text", "text": ..}`` / ``{"type": "image"}`` parts);
- optional ``id`` and ``task``.

Images are written once as PNG under ``<cache>/hf-images/<dataset fingerprint>/<split>/`` so training reads them like
any other site's files. Errors name the directory, the split, the row and the column.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from fedvlm.data.llava_json import DataError, Example, _exchanges

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "images", "img")


def is_hf_dataset_dir(path: Path) -> bool:
    """True when ``path`` looks like a ``save_to_disk`` directory."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def load_hf_split(path: Path, split: str, cache_dir: Path | None = None) -> list[Example]:
    """The examples of ``split`` ("train" or "test"); ``[]`` for a missing test split. ``DataError`` on bad rows."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: a Hugging Face datasets directory needs the 'datasets' package "
                        "(pip install 'fedvlm[hf]')") from None
    path = Path(path)
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            if split == "test":
                return []
            raise DataError(f"{path}: no {split!r} split (splits: {', '.join(loaded)})")
        table = loaded[split]
    else:
        if split == "test":
            return []
        table = loaded
    where_split = f"{path} [{split}]"
    image_column = next((c for c in IMAGE_COLUMNS if c in table.column_names), None)
    if image_column is None:
        raise DataError(f"{where_split}: no image column (expected one of {', '.join(IMAGE_COLUMNS)})")
    conv_column = next((c for c in ("conversations", "messages") if c in table.column_names), None)
    if conv_column is None:
        raise DataError(f"{where_split}: no 'conversations' or 'messages' column")
    from fedvlm.vlm.presets import default_cache_dir

    out = (Path(cache_dir) if cache_dir else default_cache_dir()) / "hf-images" / table._fingerprint / split
    out.mkdir(parents=True, exist_ok=True)
    from fedvlm.tasks import TASKS

    examples = []
    for index, row in enumerate(table):
        record_id = str(row.get("id", index))
        where = f"{where_split}: row {index} (id {record_id!r})"
        image_file = out / f"{index:07d}.png"
        if not image_file.is_file():
            _save_image(where, image_column, row[image_column], image_file)
        conversations = row[conv_column]
        if conv_column == "messages":
            conversations = _messages_to_llava(where, conversations)
        turns = _exchanges(where, conversations)
        task = row.get("task")
        if task is not None and task not in TASKS:
            raise DataError(f"{where}: column 'task': unknown task {task!r} (known: {', '.join(sorted(TASKS))})")
        examples.append(Example(id=record_id, image=image_file, question=turns[0][0], answer=turns[0][1],
                                turns=turns if len(turns) > 1 else (), task=task))
    logger.info("loaded %d %s examples from the datasets directory %s", len(examples), split, path)
    return examples


def _save_image(where: str, column: str, value, target: Path) -> None:
    from PIL import Image

    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("bytes")
    try:
        if isinstance(value, (bytes, bytearray)):
            value = Image.open(io.BytesIO(value))
        if not isinstance(value, Image.Image):
            raise TypeError(f"got {type(value).__name__}")
        tmp = target.with_suffix(".tmp.png")
        value.convert("RGB").save(tmp)
        tmp.replace(target)
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DataError(f"{where}: column '{column}': not a readable image ({exc})") from None


def _messages_to_llava(where: str, messages) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: column 'messages': expected a list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: column 'messages[{i}]': expected an object with 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "\n".join(t for t in texts if t)
        if not isinstance(content, str):
            raise DataError(f"{where}: column 'messages[{i}].content': missing or not text")
        out.append({"from": message["role"], "value": content})
    return out
