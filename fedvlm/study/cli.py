"""``fedvlm bench run | sweep | report``."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedvlm.spec import SpecError

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="In-process benchmark: the FedVLMBench study (docs/benchmark.md).")
console = Console()


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _execute(variants, out: Path, workers: int, ray_address: str | None) -> list[str]:
    from fedvlm.study.sweep import run_study, trials_of

    total = len(trials_of(variants))
    per_trial = workers <= 1 and ray_address is None  # one bar per trial, else one bar of finished trials
    with _progress_bar() as bar:
        tasks: dict[str, int] = {}
        overall = bar.add_task(f"{total} trial(s)", total=None if per_trial else total)

        def progress(trial: str, done: int, of: int, what: str) -> None:
            if not per_trial:
                bar.update(overall, completed=done, total=of, description=f"trials ({trial} finished)")
                return
            if trial not in tasks:
                tasks[trial] = bar.add_task(trial, total=of)
            bar.update(tasks[trial], completed=done, total=of, description=f"{trial}: {what}")

        ran = run_study(variants, out, workers=workers, progress=progress, ray_address=ray_address)
        bar.update(overall, completed=total, total=total)
    return ran


@bench_app.command("run")
def bench_run(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="Experiment TOML (\\[task] + "
                                            "\\[experiment])."),
              out: Path = typer.Option(..., "--out", help="Results folder (re-running resumes it)."),
              workers: int = typer.Option(1, "--workers", min=1, help="Parallel worker processes (one per seed).")
              ) -> None:
    """Run one experiment (every seed) in-process and write its results folder and report."""
    from fedvlm.study.config import Variant, load_config

    def one_variant(path: Path) -> list:
        cfg = load_config(path)
        return [Variant(cfg.experiment.name, {}, cfg)]

    _run_variants(config, one_variant, out, "config.toml", workers)


@bench_app.command("sweep")
def bench_sweep(grid: Path = typer.Argument(..., exists=True, dir_okay=False, help="Sweep TOML (\\[task], "
                                            "\\[experiment] and \\[grid])."),
                out: Path = typer.Option(..., "--out", help="Results folder (re-running skips finished trials)."),
                workers: int = typer.Option(1, "--workers", min=1, help="Parallel worker processes."),
                ray: str = typer.Option(None, "--ray", metavar="ADDRESS",
                                        help="Run the trials as tasks on the Ray cluster at ADDRESS (host:port, "
                                             "ray://host:10001, auto; 'local' starts one here). Needs fedvlm\\[ray].")
                ) -> None:
    """Run every (variant, seed) of a grid; finished trials are skipped, so an interrupted sweep resumes."""
    from fedvlm.study.config import load_grid

    _run_variants(grid, load_grid, out, "grid.toml", workers, ray)


def _run_variants(path: Path, load, out: Path, copy_as: str, workers: int, ray_address: str | None = None) -> None:
    """Load the variants of `path` (a bad key exits 2 naming it), keep a copy of the file in `out`, run every
    unfinished trial and write the report."""
    from fedvlm.study.report import write_report

    try:
        variants = load(path)
    except SpecError as exc:
        console.print(f"[red]error:[/] {path}: {exc}")
        raise typer.Exit(2) from None
    from fedvlm.study.sweep import RayUnavailable, check_ray

    try:
        if ray_address is not None:
            check_ray(ray_address)  # before the results folder is touched
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / copy_as)
        ran = _execute(variants, out, workers, ray_address)
    except RayUnavailable as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    report = write_report(out)
    console.print(f"{len(ran)} trial(s) run, {len(variants)} variant(s); report: {report}")


@bench_app.command("report")
def bench_report(out: Path = typer.Argument(..., exists=True, file_okay=False, help="A results folder.")) -> None:
    """(Re)write report.md and the plots of a results folder."""
    from fedvlm.study.report import write_report

    if not (out / "study.json").exists():
        console.print(f"[red]error:[/] {out} is not a results folder (no study.json)")
        raise typer.Exit(2)
    console.print(f"report: {write_report(out)}")
