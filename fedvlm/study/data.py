"""The site folders of a trial: a pooled dataset (built-in or a directory) split across the virtual clients.

Prepared folders are cached under a data directory by a digest of what determines them, and written to a
temporary name then renamed, so parallel sweep workers share them safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedvlm.data import partition as partitioning
from fedvlm.data.scenes import write_json
from fedvlm.study.config import BUILTIN_DATASETS, ExperimentSpec, parse_partition


@dataclass(frozen=True)
class SiteData:
    """What a trial trains and evaluates on."""

    sites: tuple[Path, ...]  # site_<i> folders (train.json, test.json), in client order
    union: Path  # one folder with every site's train records (the centralized baseline)
    eval_json: Path  # the common evaluation set every model is scored on


def prepare(experiment: ExperimentSpec, seed: int, data_root: Path) -> SiteData:
    """The site folders for ``experiment`` and partition ``seed``, built once under ``data_root``."""
    method, alpha = parse_partition(experiment.partition)
    if method == "sites":
        return _existing_sites(experiment, Path(data_root))
    pool = _pool(experiment, Path(data_root))
    pooled = hashlib.sha256((pool / "train.json").read_bytes() + (pool / "test.json").read_bytes()).hexdigest()
    key = json.dumps([str(pool), pooled, experiment.partition, experiment.partition_key, experiment.num_clients,
                      seed])
    target = Path(data_root) / f"split-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (target / "DONE").exists():
        def build(tmp: Path) -> None:
            partitioning.write_partition(pool / "train.json", tmp, method, experiment.num_clients, seed=seed,
                                         alpha=alpha or 0.5, key="task" if method == "task" else
                                         experiment.partition_key, test_json=pool / "test.json")
            _write_union(tmp / "union", [tmp / f"site_{i}" for i in range(experiment.num_clients)])
        _build_atomically(target, build)
    sites = tuple(target / f"site_{i}" for i in range(experiment.num_clients))
    empty = [i for i, site in enumerate(sites) if not json.loads((site / "train.json").read_text())]
    if empty:
        raise ValueError(f"experiment.partition: {experiment.partition} with seed {seed} leaves client(s) "
                         f"{', '.join(map(str, empty))} of {experiment.num_clients} without train records; use more "
                         "data (experiment.train_size), fewer clients or a larger alpha")
    return SiteData(sites, target / "union", pool / "test.json")


def _pool(experiment: ExperimentSpec, data_root: Path) -> Path:
    """A folder with the pooled ``train.json`` and ``test.json`` (images relative to it)."""
    if experiment.dataset not in BUILTIN_DATASETS:
        folder = Path(experiment.dataset).expanduser().resolve()
        if not (folder / "train.json").is_file() or not (folder / "test.json").is_file():
            raise ValueError(f"experiment.dataset: {folder} has no train.json and test.json to partition")
        return folder
    name, train_size, test_size = experiment.dataset, experiment.train_size, experiment.test_size
    target = data_root / f"pool-{name}-{train_size}-{test_size}"
    if not (target / "DONE").exists():
        def build(tmp: Path) -> None:
            if name == "digits":
                from fedvlm.data.digits import build_digits

                build_digits(tmp / "raw", sites=1, seed=0)  # one site: all train records, the held-out test set
                source = tmp / "raw" / "site_0"
                train = json.loads((source / "train.json").read_text())
                test = json.loads((tmp / "raw" / "test.json").read_text())
                train, test = train[:train_size or None], test[:test_size or None]
                partitioning.write_site(tmp, "train.json", train, source)
                partitioning.write_site(tmp, "test.json", test, tmp / "raw")
                shutil.rmtree(tmp / "raw")
            else:
                from fedvlm.data.builtin import build_dataset

                kwargs = {k: v for k, v in (("train_size", train_size), ("test_size", test_size)) if v}
                build_dataset(name, tmp, sites=4 if name == "multitask" else 1, seed=0, **kwargs)
        _build_atomically(target, build)
    return target


def _existing_sites(experiment: ExperimentSpec, data_root: Path) -> SiteData:
    folder = Path(experiment.dataset).expanduser().resolve()
    sites = tuple(folder / f"site_{i}" for i in range(experiment.num_clients))
    missing = [str(s) for s in sites if not (s / "train.json").is_file()]
    if missing:
        raise ValueError(f"experiment.dataset: partition \"sites\" needs site_0..site_{experiment.num_clients - 1} "
                         f"with a train.json; missing: {', '.join(missing)}")
    if not (folder / "test.json").is_file():
        raise ValueError(f"experiment.dataset: {folder}/test.json (the common evaluation set) is missing")
    digest = hashlib.sha256()
    for site in sites:  # the union is rebuilt when a site's train records change
        digest.update(str(site).encode() + b"\0" + (site / "train.json").read_bytes())
    union = data_root / f"union-{digest.hexdigest()[:16]}"
    if not (union / "DONE").exists():
        _build_atomically(union, lambda tmp: _write_union(tmp, list(sites)))
    return SiteData(sites, union, folder / "test.json")


def _write_union(folder: Path, sites: list[Path]) -> None:
    """Every site's train records in one folder (images linked; site-prefixed ids and paths never collide)."""
    records: list[dict] = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, site in enumerate(sites):
        for record in json.loads((site / "train.json").read_text()):
            record = dict(record)
            image = f"site_{i}/{record['image']}"
            dst = folder / image
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                try:
                    os.link(site / record["image"], dst)
                except OSError:
                    shutil.copy2(site / record["image"], dst)
            record["image"] = image
            records.append(record)
    write_json(folder / "train.json", records)


def _build_atomically(target: Path, build) -> None:
    """``build(tmp)`` in a sibling temporary folder, then rename it to ``target`` (another worker may win)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "DONE").exists():  # a half-built leftover: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
