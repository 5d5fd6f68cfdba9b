"""`fedvlm`: the demo, built-in data and models (the coordinator and the site agent have their own programs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedvlm: federated fine-tuning of vision-language models.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Built-in offline datasets.")
app.add_typer(data_app, name="data")
console = Console()


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-output"), "--workdir", help="Where data, state and logs go "
                                      "(recreated on every demo run)."),
         sites: int = typer.Option(3, "--sites", min=1, max=8, help="Number of client processes."),
         rounds: int = typer.Option(5, "--rounds", min=1, help="Federated rounds."),
         seed: int = typer.Option(0, "--seed")) -> None:
    """A real local federation: coordinator + client processes over mutual TLS on 127.0.0.1."""
    from fedvlm.demo import DemoError, accuracy_table, run_demo

    try:
        result = run_demo(workdir, sites=sites, rounds=rounds, seed=seed, console=console)
    except DemoError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print()
    console.print(accuracy_table(result.rounds))
    console.print(f"exported adapter (PEFT): {result.adapter_dir}")
    console.print(f"logs: {workdir / 'logs'}; coordinator state: {workdir / 'coordinator'}")
    console.print(f"done in {result.seconds:.0f}s")


@data_app.command("build")
def data_build(name: str = typer.Argument(..., help="Dataset: digits."),
               out: Path = typer.Option(..., "--out", help="Output folder."),
               sites: int = typer.Option(3, "--sites", min=1, help="Number of per-site folders."),
               seed: int = typer.Option(0, "--seed")) -> None:
    """Write a built-in dataset as LLaVA-style JSON + PNG images, split into site folders and a test set."""
    if name != "digits":
        console.print(f"[red]error:[/] unknown dataset {name!r} (available: digits)")
        raise typer.Exit(2)
    from fedvlm.data.digits import build_digits

    layout = build_digits(out, sites=sites, seed=seed)
    for i, site in enumerate(layout.site_dirs):
        console.print(f"site {i + 1}: {site}")


def main() -> None:
    app()
