"""The study report: Markdown tables (mean ± std over seeds) and PNG plots from a results folder.

Writes ``DIR/report.md``, ``DIR/rounds.png`` (headline metric vs round, one line per variant, mean over seeds)
and, when the grid sweeps ``experiment.partition``, ``DIR/heterogeneity.png`` (final metric vs partition, one
line per combination of the other swept values).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fedvlm.benchmark.config import parse_partition

PREFERRED = ("accuracy", "cider", "miou")


def headline(metrics: dict[str, float], wanted: str = "") -> str:
    """The metric the report leads with: ``wanted``, else accuracy/cider/miou, else the first one."""
    if wanted:
        return wanted
    for name in PREFERRED:
        for key in sorted(metrics):
            if key == name or key.endswith("/" + name):
                return key
    keys = [k for k in sorted(metrics) if not k.endswith("num_examples")]
    return keys[0] if keys else ""


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if values else "—"


def load_trials(out: Path) -> tuple[list[dict], list[dict]]:
    """(variants of study.json, finished trials with their summary and per-round records)."""
    study = json.loads((out / "study.json").read_text())
    trials = []
    for variant in study["variants"]:
        for seed in variant["seeds"]:
            folder = out / "trials" / variant["name"] / f"seed-{seed}"
            if not (folder / "DONE").exists():
                continue
            rounds = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line]
            trials.append({"variant": variant["name"], "seed": seed,
                           "summary": json.loads((folder / "summary.json").read_text()), "rounds": rounds})
    return study["variants"], trials


def write_report(out: Path) -> Path:
    """Write the report of results folder ``out``; returns the Markdown path."""
    out = Path(out)
    variants, trials = load_trials(out)
    by_variant = {v["name"]: [t for t in trials if t["variant"] == v["name"]] for v in variants}
    swept = sorted({k for v in variants for k in v["values"]})
    wanted = next((v["config"]["experiment"]["metric"] for v in variants if v["config"]["experiment"]["metric"]), "")
    sample = next((t["summary"]["final_metrics"] for t in trials if t["summary"]["final_metrics"]), {})
    metric = headline(sample, wanted)
    lines = [f"# Benchmark report: {out.name}", "",
             f"{len(trials)} finished trial(s) of {sum(len(v['seeds']) for v in variants)}; "
             f"headline metric: `{metric or 'none'}` (final round, mean ± std over seeds).", ""]
    header = ["variant", *[k.split(".")[-1] for k in swept], "seeds", metric or "metric", "MB up", "MB down",
              "wall s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        done = by_variant[variant["name"]]
        row = [variant["name"], *[str(variant["values"].get(k, "")) for k in swept],
               f"{len(done)}/{len(variant['seeds'])}",
               _fmt([t["summary"]["final_metrics"].get(metric) for t in done
                     if metric in t["summary"]["final_metrics"]]),
               _fmt([t["summary"]["bytes_up"] / 1e6 for t in done], 3),
               _fmt([t["summary"]["bytes_down"] / 1e6 for t in done], 3),
               _fmt([t["summary"]["wall_seconds"] for t in done], 1)]
        lines.append("| " + " | ".join(row) + " |")
    all_metrics = sorted({k for t in trials for k in t["summary"]["final_metrics"]} - {metric})
    if all_metrics:
        lines += ["", "## All final metrics", "", "| variant | " + " | ".join(all_metrics) + " |",
                  "|" + "---|" * (len(all_metrics) + 1)]
        for variant in variants:
            done = by_variant[variant["name"]]
            cells = [_fmt([t["summary"]["final_metrics"][k] for t in done if k in t["summary"]["final_metrics"]])
                     for k in all_metrics]
            lines.append(f"| {variant['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Metric per round", "", "![metric vs round](rounds.png)", ""]
    _plot_rounds(out / "rounds.png", variants, by_variant, metric)
    if "experiment.partition" in swept:
        _plot_heterogeneity(out / "heterogeneity.png", variants, by_variant, metric, swept)
        lines += ["## Metric vs heterogeneity", "", "![metric vs heterogeneity](heterogeneity.png)", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def _curve(done: list[dict], metric: str) -> tuple[list[int], list[float], list[float]]:
    per_round: dict[int, list[float]] = {}
    for trial in done:
        for record in trial["rounds"]:
            if metric in record["metrics"]:
                per_round.setdefault(record["round"], []).append(record["metrics"][metric])
    xs = sorted(per_round)
    stats = [mean_std(per_round[x]) for x in xs]
    return xs, [m for m, _ in stats], [s for _, s in stats]


def _plot_rounds(path: Path, variants: list[dict], by_variant: dict, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in variants:
        xs, means, stds = _curve(by_variant[variant["name"]], metric)
        if xs:
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=variant["name"])
    ax.set_xlabel("round")
    ax.set_ylabel(metric or "metric")
    ax.set_title("global model on the common evaluation set (mean ± std over seeds)")
    if any(by_variant.values()):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heterogeneity_order(partition: str) -> float:
    """IID first, then decreasing alpha (more heterogeneous to the right)."""
    method, alpha = parse_partition(partition)
    return -1e9 if method == "iid" else (-alpha if alpha else 1e9)


def _plot_heterogeneity(path: Path, variants: list[dict], by_variant: dict, metric: str, swept: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in swept if k != "experiment.partition"]
    lines: dict[str, list[tuple[str, list[float]]]] = {}
    for variant in variants:
        label = ", ".join(f"{k.split('.')[-1]}={variant['values'][k]}" for k in others) or "all"
        finals = [t["summary"]["final_metrics"][metric] for t in by_variant[variant["name"]]
                  if metric in t["summary"]["final_metrics"]]
        lines.setdefault(label, []).append((variant["values"]["experiment.partition"], finals))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        points = sorted(points, key=lambda p: _heterogeneity_order(p[0]))
        stats = [mean_std(v) for _, v in points]
        ax.errorbar([p for p, _ in points], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                    capsize=3, label=label)
    ax.set_xlabel("partition (more heterogeneous to the right)")
    ax.set_ylabel(metric or "metric")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
