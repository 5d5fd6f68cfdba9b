"""Trials of a study: every (variant, seed) of a config or a grid, resumable and optionally in parallel processes.

Results folder::

    DIR/study.json                          the variants (name, swept values, resolved config) and seeds
    DIR/versions.json                       python and package versions
    DIR/data/                               prepared site folders, shared by the trials
    DIR/trials/<variant>/seed-<s>/          config.json, rounds.jsonl, clients.jsonl, summary.json, DONE

A trial is finished when its ``DONE`` marker exists (written atomically, last) and its ``config.json`` is the
config it would run now; a re-run skips finished trials and redoes the others (unfinished, or whose config changed)
from scratch.

Trials run in this process, in worker processes (``workers``), or as Ray tasks (``ray_address``, one CPU each):
a Ray task runs its trial in a temporary folder on its node (built-in data prepared under the node's temporary
directory) and returns the trial's files, which the driver writes into ``DIR`` (``DONE`` last), so the cluster
needs no shared file system; a dataset given as a directory must exist at the same path on every node.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fedvlm.study.config import BenchConfig, Variant

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
    """Finished, with the config it would run now: a trial whose config changed since (an edited grid file, a
    new default) is not done, and re-runs."""
    folder = trial_dir(out, trial)
    if not (folder / DONE).exists():
        return False
    try:
        return json.loads((folder / "config.json").read_text()) == json.loads(json.dumps(_recorded_config(trial)))
    except (OSError, ValueError):
        return False


def _recorded_config(trial: Trial) -> dict:
    """What a trial's ``config.json`` holds: variant, seed and the resolved config (task.seed = the trial's)."""
    return {"variant": trial.variant, "seed": trial.seed, **trial.config.to_dict(),
            "task": json.loads(trial.config.for_seed(trial.seed).to_json())}


def write_study(out: Path, variants: list[Variant]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    study = {"variants": [{"name": v.name, "values": v.values, "config": v.config.to_dict(),
                           "seeds": list(v.config.experiment.seeds)} for v in variants]}
    _write_atomic(out / "study.json", json.dumps(study, indent=2, sort_keys=True))
    _write_atomic(out / "versions.json", json.dumps(versions(), indent=2, sort_keys=True))


class RayUnavailable(RuntimeError):
    """``--ray`` was asked for but Ray is not installed or the cluster cannot be reached."""


def run_study(variants: list[Variant], out: Path, workers: int = 1, progress: Progress | None = None,
              ray_address: str | None = None) -> list[str]:
    """Run every unfinished trial; returns the ids of the trials run now (finished ones are skipped)."""
    out = Path(out)
    if ray_address is not None:
        check_ray(ray_address)  # before anything is written
    write_study(out, variants)
    todo = [t for t in trials_of(variants) if not is_done(out, t)]
    if ray_address is not None:
        _run_on_ray(todo, out, ray_address, progress)
        return [t.id for t in todo]
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


def _run_on_ray(todo: list[Trial], out: Path, address: str, progress: Progress | None) -> None:
    """One Ray task per trial (1 CPU); each finished trial's files are written into ``out`` as it arrives."""
    import ray

    started_here = not ray.is_initialized()
    try:
        ray.init(address=None if address == "local" else address, logging_level="WARNING", log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {exc}") from None
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(_ray_trial)
        pending = {remote.remote(trial): trial for trial in todo}
        finished = 0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            trial = pending.pop(ready[0])
            _install(out, trial, ray.get(ready[0]))  # a failed trial raises: the finished ones are kept
            finished += 1
            if progress is not None:
                progress(trial.id, finished, len(todo), "trials")
    finally:
        if started_here:
            ray.shutdown()


def check_ray(address: str) -> None:
    """``RayUnavailable`` unless Ray is installed and a ``host:port`` address accepts a TCP connection within 5 s
    (Ray itself retries for minutes)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayUnavailable("--ray needs Ray: pip install 'fedvlm[ray]'") from None
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "local", "auto", "ray://...": Ray resolves them
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {exc}") from None


def _ray_trial(trial: Trial) -> dict[str, bytes]:
    """Run one trial in a temporary folder on this node; return its files (relative name -> content)."""
    import torch

    torch.set_num_threads(1)
    data_root = Path(tempfile.gettempdir()) / "fedvlm-bench-data"
    with tempfile.TemporaryDirectory(prefix="fedvlm-trial-") as tmp:
        run_one(trial, Path(tmp), None, data_root=data_root)
        folder = trial_dir(Path(tmp), trial)
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _install(out: Path, trial: Trial, files: dict[str, bytes]) -> None:
    """Write a trial's files returned by a remote task into its folder, ``DONE`` last."""
    folder = trial_dir(out, trial)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, content in files.items():
        if name != DONE:
            (folder / name).write_bytes(content)
    _write_atomic(folder / DONE, files.get(DONE, b"").decode() or f"{time.time()}\n")


def _worker(trial: Trial, out: str) -> None:
    import torch

    torch.set_num_threads(1)  # several workers share the cores
    run_one(trial, Path(out), None)


def run_one(trial: Trial, out: Path, progress: Progress | None = None, data_root: Path | None = None) -> dict:
    """Run one trial into its folder (wiped first if an earlier attempt left it unfinished); returns its summary.
    Prepared data goes under ``data_root`` (default ``out/data``)."""
    from fedvlm.study.data import prepare
    from fedvlm.study.simulate import run_trial

    folder = trial_dir(out, trial)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _write_atomic(folder / "config.json", json.dumps(_recorded_config(trial), indent=2, sort_keys=True))
    started = time.time()
    data = prepare(trial.config.experiment, trial.seed, Path(data_root or Path(out) / "data"))

    def relay(done: int, total: int, what: str) -> None:
        if progress is not None:
            progress(trial.id, done, total, what)

    result = run_trial(trial.config, trial.seed, data, folder, relay)
    summary = {"variant": trial.variant, "seed": trial.seed, "final_metrics": result.final_metrics,
               "bytes_up": result.bytes_up, "bytes_down": result.bytes_down,
               "wall_seconds": round(result.seconds, 3), "started_at": started, "finished_at": time.time(),
               "sites": [str(s) for s in data.sites], "stop_reason": result.stop_reason}
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
