"""``fedvlm data build NAME``: the built-in offline datasets, each written as pooled splits plus site folders.

Layout of every scene dataset and of the multi-task bundle::

    OUT/train.json  OUT/test.json  OUT/images/...          the pooled splits (feed them to ``data partition``)
    OUT/site_<i>/{train.json,test.json,images/}            ready-to-use site folders (``--data OUT/site_<i>``)
    OUT/partition.{json,md}  OUT/label_heatmap.png ...     the partition report of the site split

``vqa``, ``captioning``, ``grounding``: scenes of real digits (``fedvlm.data.scenes``), sites split IID.
``multitask``: one task per site (site_0 classification on single digits, site_1 vqa, site_2 captioning,
site_3 grounding; with more sites the tasks repeat round-robin); every record names its ``task``; run it with
``task_type = "multitask"``. ``digits`` keeps its own layout (``fedvlm.data.digits``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedvlm.data import partition
from fedvlm.data.scenes import SCENE_TASKS, digit_pools, write_json, write_scene_split

logger = logging.getLogger(__name__)

BUILTIN = ("digits", "vqa", "captioning", "grounding", "multitask")
MULTITASK_ORDER = ("classification", "vqa", "captioning", "grounding")
TASK_OF = {"digits": "classification", "vqa": "vqa", "captioning": "captioning", "grounding": "grounding",
           "multitask": "multitask"}
DIGITS_QUESTION = "What digit is shown?"


@dataclass(frozen=True)
class BuiltLayout:
    """What ``build_dataset`` wrote."""

    root: Path
    task_type: str  # the ``task.task_type`` a run on it should use
    site_dirs: tuple[Path, ...]
    train_size: int
    test_size: int


def build_dataset(name: str, out: Path, sites: int = 3, seed: int = 0, train_size: int = 480,
                  test_size: int = 120) -> BuiltLayout:
    """Write built-in dataset ``name`` (one of ``BUILTIN``) under ``out``; deterministic in ``seed``.

    ``train_size``/``test_size`` are per task (the multi-task bundle holds four times as many records).
    """
    out = Path(out)
    if name not in BUILTIN:
        raise ValueError(f"unknown dataset {name!r} (available: {', '.join(BUILTIN)})")
    if name == "digits":
        from fedvlm.data.digits import build_digits

        layout = build_digits(out, sites=sites, seed=seed)
        return BuiltLayout(out, "classification", layout.site_dirs, sum(layout.train_sizes), sum(layout.test_sizes))
    tasks = (name,) if name in SCENE_TASKS else MULTITASK_ORDER
    train, test = [], []
    for task in tasks:
        image_dir = "images" if len(tasks) == 1 else f"images/{task}"
        if task == "classification":
            train += classification_records(out, "train", train_size, seed, image_dir)
            test += classification_records(out, "test", test_size, seed, image_dir)
        else:
            train += write_scene_split(out, task, "train", train_size, seed, image_dir)
            test += write_scene_split(out, task, "test", test_size, seed, image_dir)
    write_json(out / "train.json", train)
    write_json(out / "test.json", test)
    method = "iid" if len(tasks) == 1 else "task"
    if method == "task" and sites < len(tasks):
        raise ValueError(f"the multitask bundle needs at least {len(tasks)} sites (one per task), got {sites}")
    if method == "task":
        _write_task_sites(out, train, test, sites)
        report_key = "task"
    else:
        partition.write_partition(out / "train.json", out, "iid", sites, seed=seed, key="num_digits",
                                  test_json=out / "test.json")
        report_key = "num_digits"
    logger.info("built %s under %s (%d train, %d test, %d sites, report on %s)", name, out, len(train), len(test),
                sites, report_key)
    return BuiltLayout(out, TASK_OF[name], tuple(out / f"site_{i}" for i in range(sites)), len(train), len(test))


def _write_task_sites(out: Path, train: list[dict], test: list[dict], sites: int) -> None:
    """Site i holds task ``MULTITASK_ORDER[i % 4]``; sites sharing a task split its records IID."""
    train_parts: list[list[int]] = []
    for split, records in (("train", train), ("test", test)):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for t, task in enumerate(MULTITASK_ORDER):
            owners = [i for i in range(sites) if i % len(MULTITASK_ORDER) == t]
            members = [j for j, r in enumerate(records) if r["task"] == task]
            for k, owner in enumerate(owners):
                parts[owner] += members[k::len(owners)]
        for i, part in enumerate(parts):
            partition.write_site(out / f"site_{i}", f"{split}.json", [records[j] for j in part], out)
        if split == "train":
            train_parts = parts
    labels = [r["task"] for r in train]
    partition.write_report(out, partition.partition_report(labels, train_parts, "task", "task", alpha=0.0, seed=0))


def classification_records(out: Path, split: str, count: int, seed: int, image_dir: str) -> list[dict]:
    """``count`` single-digit classification records (32 px, as ``fedvlm.data.digits``) tagged ``task``."""
    from fedvlm.data.digits import digit_image

    images, labels, train_pool, test_pool = digit_pools(seed)
    pool = train_pool if split == "train" else test_pool
    chosen = np.random.default_rng([seed, 99, 0 if split == "train" else 1]).permutation(pool)[:count]
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for index in chosen:
        relative = f"{image_dir}/digit_{int(index):04d}.png"
        digit_image(images[index], 32).save(out / relative)
        records.append({"id": f"classification-{int(index):04d}", "image": relative, "task": "classification",
                        "conversations": [{"from": "human", "value": f"<image>\n{DIGITS_QUESTION}"},
                                          {"from": "gpt", "value": str(int(labels[index]))}],
                        "label": int(labels[index])})
    return records
