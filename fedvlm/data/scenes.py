"""Built-in offline scene datasets: real handwritten digits (scikit-learn) composed into small scenes.

A scene is a 32 x 32 black RGB image cut into a 4 x 4 grid of 8 x 8 cells, matching the tiny preset's 8-px patches.
One to three *distinct* digits are drawn at their native 8 x 8 resolution (real pixels of ``load_digits``, grey
levels 0-16 scaled to 0-255) into distinct cells. Train scenes use only digit images of the train pool and test
scenes only those of the test pool (a seeded 78/22 split of the 1,797 digits), so no test pixel is seen in training.

Tasks built on scenes (``build_scenes(task=...)``), each record carrying ``task`` and the scene's metadata
(``digits``, ``boxes``, ``num_digits`` and, for VQA, ``question_type``), which partitioners can key on:

- ``vqa``: two-turn conversations (both turns are trained on; evaluation asks the first). Question types:
  ``count`` ("How many digits are there?" -> "2"), ``exists`` ("Is there a 7?" -> "yes"/"no"),
  ``left_of`` ("Is the 4 left of the 9?" -> "yes"/"no", x of the cells), ``leftmost`` ("What is the leftmost
  digit?" -> "4", asked only when one digit is alone in the leftmost occupied column).
- ``captioning``: "Describe the image." -> "two digits: 4 and 7 from left to right" (digits ordered by column,
  then row).
- ``grounding``: "Where is the 7?" -> "[8, 16, 16, 24]": the 7's cell in the ``xyxy-pixel`` convention
  (x_min, y_min, x_max, y_max; top-left origin; max exclusive; pixels of the 32 x 32 image).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCENE_SIZE = 32
CELL = 8
GRID = SCENE_SIZE // CELL
MAX_DIGITS = 3
SCENE_TASKS = ("vqa", "captioning", "grounding")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
TEST_FRACTION = 0.22


@dataclass(frozen=True)
class Scene:
    """Digit values and their cells (row, col) in drawing order; ``sources`` are load_digits indices."""

    digits: tuple[int, ...]
    cells: tuple[tuple[int, int], ...]
    sources: tuple[int, ...]

    def box(self, i: int) -> tuple[int, int, int, int]:
        """The ``xyxy-pixel`` box of digit ``i``'s cell."""
        row, col = self.cells[i]
        return (col * CELL, row * CELL, (col + 1) * CELL, (row + 1) * CELL)


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def digit_pools(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, train_pool, test_pool)``: all digits and a seeded disjoint split of their indices."""
    digits = _load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_test = round(len(order) * TEST_FRACTION)
    return digits.images, digits.target, order[n_test:], order[:n_test]


def sample_scene(rng: np.random.Generator, labels: np.ndarray, pool: np.ndarray) -> Scene:
    """One random scene: 1..3 distinct digit values in distinct cells, each image drawn from ``pool``."""
    k = int(rng.integers(1, MAX_DIGITS + 1))
    values = rng.choice(10, size=k, replace=False)
    cells = rng.choice(GRID * GRID, size=k, replace=False)
    sources = []
    for value in values:
        candidates = pool[labels[pool] == value]
        sources.append(int(rng.choice(candidates)))
    return Scene(tuple(int(v) for v in values), tuple((int(c) // GRID, int(c) % GRID) for c in cells),
                 tuple(sources))


def render_scene(scene: Scene, images: np.ndarray):
    """The scene as a 32 x 32 RGB ``PIL.Image`` (white digits on black)."""
    from PIL import Image

    canvas = np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=np.uint8)
    for source, (row, col) in zip(scene.sources, scene.cells, strict=True):
        pixels = np.clip(images[source] * (255.0 / 16.0), 0, 255).astype(np.uint8)
        canvas[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL] = pixels
    return Image.fromarray(canvas, mode="L").convert("RGB")


def left_to_right(scene: Scene) -> list[int]:
    """Digit values ordered by column, then row."""
    order = sorted(range(len(scene.digits)), key=lambda i: (scene.cells[i][1], scene.cells[i][0]))
    return [scene.digits[i] for i in order]


def caption(scene: Scene) -> str:
    """The reference caption, e.g. ``"three digits: 4, 7 and 1 from left to right"``."""
    values = [str(v) for v in left_to_right(scene)]
    if len(values) == 1:
        return f"one digit: {values[0]}"
    listed = ", ".join(values[:-1]) + " and " + values[-1]
    return f"{NUMBER_WORDS[len(values)]} digits: {listed} from left to right"


def vqa_pair(scene: Scene, kind: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """``(question_type, question, answer)`` of the requested kind, falling back to ``count`` when the scene
    cannot pose it unambiguously."""
    if kind == "exists":
        value = int(rng.choice(scene.digits)) if rng.random() < 0.5 else int(rng.integers(10))
        return "exists", f"Is there a {value}?", "yes" if value in scene.digits else "no"
    if kind == "left_of" and len(scene.digits) >= 2:
        i, j = (int(x) for x in rng.choice(len(scene.digits), size=2, replace=False))
        if scene.cells[i][1] != scene.cells[j][1]:
            left = scene.cells[i][1] < scene.cells[j][1]
            return "left_of", f"Is the {scene.digits[i]} left of the {scene.digits[j]}?", "yes" if left else "no"
    if kind == "leftmost":
        first_col = min(c for _, c in scene.cells)
        in_col = [i for i, (_, c) in enumerate(scene.cells) if c == first_col]
        if len(in_col) == 1:
            return "leftmost", "What is the leftmost digit?", str(scene.digits[in_col[0]])
    return "count", "How many digits are there?", str(len(scene.digits))


VQA_KINDS = ("count", "exists", "left_of", "leftmost")


def scene_record(task: str, scene: Scene, index: int, split: str, rng: np.random.Generator,
                 image_dir: str = "images") -> dict:
    """The LLaVA-style record of one scene for ``task`` (image path ``<image_dir>/<split>_<index>.png``)."""
    record: dict = {"id": f"{task}-{split}-{index:04d}", "image": f"{image_dir}/{split}_{index:04d}.png",
                    "task": task}
    if task == "vqa":
        first, second = rng.choice(len(VQA_KINDS), size=2, replace=False)
        kind, question, answer = vqa_pair(scene, VQA_KINDS[int(first)], rng)
        _, question2, answer2 = vqa_pair(scene, VQA_KINDS[int(second)], rng)
        turns = [(f"<image>\n{question}", answer), (question2, answer2)]
        record["question_type"] = kind
    elif task == "captioning":
        turns = [("<image>\nDescribe the image.", caption(scene))]
    elif task == "grounding":
        target = int(rng.integers(len(scene.digits)))
        box = scene.box(target)
        turns = [(f"<image>\nWhere is the {scene.digits[target]}?", "[" + ", ".join(str(v) for v in box) + "]")]
        record["target"] = scene.digits[target]
    else:
        raise ValueError(f"unknown scene task {task!r} (known: {', '.join(SCENE_TASKS)})")
    record["conversations"] = [m for q, a in turns for m in ({"from": "human", "value": q},
                                                             {"from": "gpt", "value": a})]
    record["digits"] = list(scene.digits)
    record["boxes"] = [list(scene.box(i)) for i in range(len(scene.digits))]
    record["num_digits"] = len(scene.digits)
    return record


def write_scene_split(folder: Path, task: str, split: str, count: int, seed: int,
                      image_dir: str = "images") -> list[dict]:
    """Render ``count`` scenes of ``split`` ("train"/"test") into ``folder/<image_dir>`` and return their records
    (deterministic in ``seed``; the caller writes the JSON)."""
    images, labels, train_pool, test_pool = digit_pools(seed)
    pool = train_pool if split == "train" else test_pool
    task_offset = SCENE_TASKS.index(task) if task in SCENE_TASKS else 0
    rng = np.random.default_rng([seed, task_offset, 0 if split == "train" else 1])
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(count):
        scene = sample_scene(rng, labels, pool)
        record = scene_record(task, scene, index, split, rng, image_dir)
        render_scene(scene, images).save(folder / record["image"])
        records.append(record)
    return records


def write_json(path: Path, records: list[dict]) -> Path:
    """Write ``records`` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
