"""Trials of a study: every (variant, seed) of a config or a grid, resumable and optionally in parallel processes.

Results folder::

    DIR/study.json                          the variants (name, swept values, resolved config) and seeds
    DIR/versions.json                       python and package versions
    DIR/data/                               prepared site folders, shared by the trials
    DIR/trials/<variant>/seed-<s>/          config.json, rounds.jsonl, clients.jsonl, summary.json, DONE

A trial is finished when its ``DONE`` marker exists (written atomically, last); a re-run skips finished trials
and redoes unfinished ones from scratch.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fedvlm.benchmark.config import BenchConfig, Variant

DONE = "DONE"
Progress = Callable[[str, int, int, str], None]  # (trial id, done, total, what)


@dataclass(frozen=True)
class Trial:
    variant: str
    seed: int
    config: BenchConfig

    @property
    def id(self) -> str:
        return f"{self.variant}/seed-{self.seed}"


def trials_of(variants: list[Variant]) -> list[Trial]:
    return [Trial(v.name, seed, v.config) for v in variants for seed in v.config.experiment.seeds]


def trial_dir(out: Path, trial: Trial) -> Path:
    return Path(out) / "trials" / trial.variant / f"seed-{trial.seed}"


def is_done(out: Path, trial: Trial) -> bool:
    return (trial_dir(out, trial) / DONE).exists()


def write_study(out: Path, variants: list[Variant]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    study = {"variants": [{"name": v.name, "values": v.values, "config": v.config.to_dict(),
                           "seeds": list(v.config.experiment.seeds)} for v in variants]}
    _write_atomic(out / "study.json", json.dumps(study, indent=2, sort_keys=True))
    _write_atomic(out / "versions.json", json.dumps(versions(), indent=2, sort_keys=True))


def run_study(variants: list[Variant], out: Path, workers: int = 1, progress: Progress | None = None) -> list[str]:
    """Run every unfinished trial; returns the ids of the trials run now (finished ones are skipped)."""
    out = Path(out)
    write_study(out, variants)
    todo = [t for t in trials_of(variants) if not is_done(out, t)]
    if workers <= 1 or len(todo) <= 1:
        for trial in todo:
            run_one(trial, out, progress)
        return [t.id for t in todo]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_worker, trial, str(out)): trial for trial in todo}
        for finished, future in enumerate(as_completed(futures), start=1):
            future.result()  # a failed trial fails the sweep (its folder has no DONE: a re-run redoes it)
            if progress is not None:
                progress(futures[future].id, finished, len(todo), "trials")
    return [t.id for t in todo]


def _worker(trial: Trial, out: str) -> None:
    import torch

    torch.set_num_threads(1)  # several workers share the cores
    run_one(trial, Path(out), None)


def run_one(trial: Trial, out: Path, progress: Progress | None = None) -> dict:
    """Run one trial into its folder (wiped first if an earlier attempt left it unfinished); returns its summary."""
    from fedvlm.benchmark.data import prepare
    from fedvlm.benchmark.simulate import run_trial

    folder = trial_dir(out, trial)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    resolved = {**trial.config.to_dict(), "task": json.loads(trial.config.for_seed(trial.seed).to_json())}
    _write_atomic(folder / "config.json", json.dumps({"variant": trial.variant, "seed": trial.seed, **resolved},
                                                     indent=2, sort_keys=True))
    started = time.time()
    data = prepare(trial.config.experiment, trial.seed, Path(out) / "data")

    def relay(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress(trial.id, done, total, what)

    result = run_trial(trial.config, trial.seed, data, folder, relay)
    summary = {"variant": trial.variant, "seed": trial.seed, "final_metrics": result.final_metrics,
               "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
               "wall_seconds": round(result.seconds, 3), "started_at": started, "finished_at": time.time(),
               "sites": [str(s) for s in data.sites]}
    from fedvlm import adapters

    (folder / "global.safetensors").write_bytes(adapters.to_bytes(result.global_state))
    _write_atomic(folder / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    _write_atomic(folder / DONE, f"{time.time()}\n")
    return summary


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("fedvlm", "torch", "transformers", "peft", "safetensors", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
