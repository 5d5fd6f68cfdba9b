"""`fedvlm-client`: the site agent and container entrypoint."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from fedvlm.data.llava_json import DataError
from fedvlm.data.sources import resolve_site_data
from fedvlm.logs import setup_logging

from .identity import EnrollmentError, StateDir

app = typer.Typer(add_completion=False)


def _device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command()
def run(coordinator: str = typer.Option(..., "--coordinator", "-c", envvar="FEDVLM_COORDINATOR",
                                        help="HOST:PORT of the coordinator's federation port."),
        data: Path = typer.Option(..., "--data", envvar="FEDVLM_DATA",
                                  help="This site's data: a folder (train.json, test.json, images), a FedVLMBench "
                                  "client JSON file or a Hugging Face save_to_disk folder."),
        join_token: str = typer.Option("", "--join-token", envvar="FEDVLM_JOIN_TOKEN",
                                       help="One-time token from `fedvlm-coord enroll` (first start only)."),
        state: Path = typer.Option(Path("fedvlm-site"), "--state", envvar="FEDVLM_STATE",
                                   help="Where the key, certificate and transfers in progress are kept."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        cache: Path = typer.Option(None, "--cache", envvar="FEDVLM_CACHE", help="Model cache directory."),
        max_upload_rate: float = typer.Option(0.0, "--max-upload-rate",
                                              help="Upload bandwidth cap in MB/s (0 = unlimited)."),
        threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0 = torch's default)."),
        lora_rank: int = typer.Option(
            0, "--lora-rank", min=0, envvar="FEDVLM_LORA_RANK",
            help="Site-local LoRA rank (0 = the task's task.lora.r), e.g. lower for a site with less memory or "
            "compute. Only for runs with task.algorithm.lora_aggregation = \"exact\" (lora_exact = true) or "
            "\"flora\" (refused otherwise). exact: each global is re-factorised to this rank on download (the best "
            "rank-R approximation of B·A below the global's rank, exact above it) and the coordinator averages the "
            "products B·A. flora: the site trains a fresh rank-R LoRA every round and the coordinator stacks the "
            "sites' pairs. The initial adapter is always built at the task's rank."),
        nproc: int = typer.Option(
            1, "--nproc", envvar="FEDVLM_NPROC",
            help="Data-parallel processes that train each round (torch.distributed: NCCL on cuda:0..N-1, gloo on "
            "CPU cores). The site still sends one signed update, equal to one process's up to float rounding: each "
            "effective batch (task.train.batch_size x grad_accum_steps) is split over the processes. At most the "
            "visible GPUs (or CPU cores)."),
        keep_running: bool = typer.Option(
            False, "--keep-running", envvar="FEDVLM_KEEP_RUNNING",
            help="After a run ends, stay connected and take part in the federation's next run (`fedvlm-coord run "
            "new`) instead of exiting."),
        progress_every: float = typer.Option(10.0, "--progress-every", min=0.0,
                                             help="Seconds between progress lines of a local round (0: every step)."),
        log_level: str = typer.Option("INFO", "--log-level")) -> None:
    """Join the federation (enrolling with the token the first time), then train rounds until the run ends."""
    setup_logging(log_level)
    from .agent import Agent, FatalError  # imports torch: after the cheap checks, so --help and errors are fast
    from .parallel import SiteWorkers, check_nproc, rank_device

    if not (data.is_dir() or (data.is_file() and data.suffix == ".json")):
        typer.echo(f"error: --data {data} is not a directory or a .json file", err=True)
        raise typer.Exit(2)
    try:
        check_nproc(nproc, _device(device))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:  # a site's data is checked whole before it enrolls or takes a round: one line names file, record, field
        site_data = resolve_site_data(data)
        for split in ("train", "test"):
            site_data.load(split)
    except DataError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    state_dir = StateDir(state)
    identity = state_dir.load()
    try:
        if identity is None:
            if not join_token:
                typer.echo(f"error: {state} holds no identity yet: pass --join-token from `fedvlm-coord enroll`",
                           err=True)
                raise typer.Exit(2)
            identity = state_dir.enroll(coordinator, join_token)
            typer.echo(f"enrolled as {identity.name} in federation {identity.federation_id[:12]}", err=True)
        import torch

        if threads or nproc > 1:  # the site's cores are shared by its processes
            torch.set_num_threads(threads or max(1, torch.get_num_threads() // nproc))
        if cache:
            os.environ["FEDVLM_CACHE"] = str(cache)
        workers = None
        if nproc > 1:
            workers = SiteWorkers(nproc, _device(device), data, cache, torch.get_num_threads(), log_level)
            workers.start()
        try:
            Agent(coordinator, identity, state_dir, data,
                  rank_device(_device(device), 0) if workers else _device(device), cache,
                  max_upload_rate * 1e6, lora_rank=lora_rank, workers=workers, keep_running=keep_running,
                  progress_every=progress_every).run()
        finally:
            if workers is not None:
                workers.close()
    except (EnrollmentError, FatalError, DataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def main() -> None:
    app()
