"""The study report: Markdown tables (mean ± std over seeds) and PNG plots from a results folder.

Writes ``DIR/report.md`` and:

- ``rounds.png``: headline metric vs round, mean ± std over seeds;
- ``heterogeneity.png`` (the grid sweeps ``experiment.partition``): final metric vs partition, with a table of the
  drop from IID to the most heterogeneous split;
- ``radar.png`` (multi-task metrics): each task's primary metric per variant, as the FedVLMBench radar charts;
- ``to_target.png`` (``experiment.target`` set): metric vs megabytes communicated and vs the simulated clock, with
  a table of rounds, simulated seconds and bytes until the target.

Plots with many variants are split in panels: one line per value of the algorithm (or the last swept key) and
per baseline, one panel per combination of the other swept keys. A baseline that does not depend on a panel's key
(the centralized model and the split) is drawn in every panel it matches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from fedvlm.study.config import BASELINES, ExperimentSpec, parse_partition

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
    defaults = dataclasses.asdict(ExperimentSpec())
    for variant in study["variants"]:  # a folder written before a key existed reads as its default
        variant["config"]["experiment"] = {**defaults, **variant["config"]["experiment"]}
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
    swept = _swept_keys(variants)
    experiments = [v["config"]["experiment"] for v in variants]
    metric_of = _headlines(variants, by_variant, experiments)
    metrics = list(dict.fromkeys(metric_of.values()))  # several when the grid sweeps datasets of different tasks
    lines = [f"# Benchmark report: {out.name}", "",
             f"{len(trials)} finished trial(s) of {sum(len(v['seeds']) for v in variants)}; "
             f"headline metric: {_names(metrics)} (final round, mean ± std over seeds).", ""]
    columns = [k for k in swept if k != "experiment.baseline"]
    header = ["variant", *[k.split(".")[-1] for k in columns], "baseline", "seeds",
              metrics[0] if len(metrics) == 1 else "metric", "MB up", "MB down", "wall s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        done = by_variant[variant["name"]]
        value = _fmt(_finals(done, metric_of[variant["name"]]))
        row = [variant["name"], *[str(variant["values"].get(k, "")) for k in columns], _baseline(variant),
               f"{len(done)}/{len(variant['seeds'])}", value if len(metrics) == 1 else
               f"{metric_of[variant['name']]} {value}",
               _fmt([t["summary"]["bytes_up"] / 1e6 for t in done], 3),
               _fmt([t["summary"]["bytes_down"] / 1e6 for t in done], 3),
               _fmt([t["summary"]["wall_seconds"] for t in done], 1)]
        lines.append("| " + " | ".join(row) + " |")
    stopped = [t for t in trials if t["summary"].get("stop_reason")]
    if stopped:
        lines += ["", "## Stopped early", "", "These trials ended before their last round (as the coordinator "
                  "stops a run); their final metrics are those of the last released global.", ""]
        lines += [f"- {t['variant']} seed {t['seed']}: {t['summary']['stop_reason']}" for t in stopped]
    all_metrics = sorted(k for k in {k for t in trials for k in t["summary"]["final_metrics"]} - set(metrics)
                         if not k.endswith("num_examples"))  # the evaluation set's size, the same for all
    if all_metrics:
        lines += ["", "## All final metrics", "", "| variant | " + " | ".join(all_metrics) + " |",
                  "|" + "---|" * (len(all_metrics) + 1)]
        for variant in variants:
            cells = [_fmt(_finals(by_variant[variant["name"]], k)) for k in all_metrics]
            lines.append(f"| {variant['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Metric per round", "", "![metric vs round](rounds.png)", ""]
    _plot_rounds(out / "rounds.png", variants, by_variant, metric_of, swept)
    if "experiment.partition" in swept:
        lines += ["## Metric vs heterogeneity", "", "![metric vs heterogeneity](heterogeneity.png)", "",
                  *_heterogeneity(out / "heterogeneity.png", variants, by_variant, metric_of, swept), ""]
    tasks = _task_metrics(all_metrics + metrics)
    if len(tasks) >= 2:
        _plot_radar(out / "radar.png", variants, by_variant, tasks)
        lines += ["## Per task (multi-task)", "", "Each task's primary metric, relative to the best variant on that "
                  "task (1.0 = best).", "", "![per-task radar](radar.png)", ""]
    if any(e["target"] > 0 for e in experiments):
        lines += ["## Cost to reach the target", "", *_to_target(out / "to_target.png", variants, by_variant,
                                                                 metric_of), ""]
    if any(e["round_deadline"] > 0 or e["stragglers"] > 0 for e in experiments):
        lines += ["## Stragglers and the round deadline", "", *_straggler_table(variants, by_variant), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def _headlines(variants: list[dict], by_variant: dict, experiments: list[dict]) -> dict[str, str]:
    """Each variant's headline metric: ``experiment.metric`` if set, else from its own final metrics (a grid over
    datasets mixes tasks: accuracy for VQA, cider for captioning)."""
    wanted = next((e["metric"] for e in experiments if e["metric"]), "")

    def sample(trials: list[dict]) -> dict[str, float]:
        return next((t["summary"]["final_metrics"] for t in trials if t["summary"]["final_metrics"]), {})

    fallback = sample([t for trials in by_variant.values() for t in trials])  # a variant with no finished trial
    return {v["name"]: headline(sample(by_variant[v["name"]]) or fallback, wanted) for v in variants}


def _names(metrics) -> str:
    return ", ".join(f"`{m}`" for m in dict.fromkeys(metrics) if m) or "`none`"


def _ylabel(metric_of: dict[str, str], members: list[dict]) -> str:
    return ", ".join(dict.fromkeys(metric_of[v["name"]] for v in members if metric_of[v["name"]])) or "metric"


def _swept_keys(variants: list[dict]) -> list[str]:
    """Swept keys in grid order (first appearance), ``experiment.baseline`` last."""
    keys: list[str] = []
    for variant in variants:
        keys += [k for k in variant["values"] if k not in keys]
    return sorted(keys, key=lambda k: k == "experiment.baseline")


def _baseline(variant: dict) -> str:
    return variant["config"]["experiment"]["baseline"]


def _finals(done: list[dict], metric: str) -> list[float]:
    return [t["summary"]["final_metrics"][metric] for t in done if metric in t["summary"]["final_metrics"]]


def _curve(done: list[dict], metric: str, x: str = "round") -> tuple[list[float], list[float], list[float]]:
    """Mean ± std over seeds of ``metric`` against the round (or another per-round x, see ``_xs``)."""
    per_x: dict[float, list[float]] = {}
    for trial in done:
        for xv, record in zip(_xs(trial, x), trial["rounds"], strict=True):
            if metric in record["metrics"]:
                per_x.setdefault(xv, []).append(record["metrics"][metric])
    xs = sorted(per_x)
    stats = [mean_std(per_x[v]) for v in xs]
    return xs, [m for m, _ in stats], [s for _, s in stats]


def _xs(trial: dict, x: str) -> list[float]:
    """Per round of a trial: the round, the cumulative MB communicated (``mb``) or the simulated clock."""
    if x == "round":
        return [r["round"] for r in trial["rounds"]]
    if x == "clock":
        return [round(r.get("sim_clock", 0.0), 6) for r in trial["rounds"]]
    total, out = 0, []
    for record in trial["rounds"]:
        total += record["bytes_up"] + record["bytes_down"]
        out.append(round(total / 1e6, 6))
    return out


def _line_key(keys: list[str]) -> str | None:
    """The swept key drawn as lines within a panel: the algorithm if swept, else the last grid key."""
    grid = [k for k in keys if k != "experiment.baseline"]
    return next((k for k in grid if k.startswith("task.algorithm")), grid[-1] if grid else None)


def _panels(variants: list[dict], keys: list[str]) -> tuple[list[tuple], dict[tuple, list[tuple[str, dict]]]]:
    """Group variants into panels (by every key but the line key) and label each line in its panel."""
    line = _line_key(keys)
    facets = [k for k in keys if k not in (line, "experiment.baseline")]
    panels: list[tuple] = []
    for variant in variants:
        key = tuple((k, variant["values"][k]) for k in facets if k in variant["values"])
        if len(key) == len(facets) and key not in panels:
            panels.append(key)
    members: dict[tuple, list[tuple[str, dict]]] = {p: [] for p in panels}
    for variant in variants:
        values = variant["values"]
        label = str(values[line]) if line in values else ""
        if _baseline(variant) != "federated":
            label = f"{label} ({_baseline(variant)})" if label else _baseline(variant)
        elif line is None:  # nothing left to tell the federated variants apart (e.g. only the partition is swept)
            label = "federated"
        for panel in panels:  # a missing facet key (a baseline that does not depend on it) matches every panel
            if all(values.get(k, v) == v for k, v in panel):
                members[panel].append((label or variant["name"], variant))
    return panels, members


def _figure(count: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, count) if count <= 3 else min(4, math.ceil(math.sqrt(count)))  # 4 panels: 2 x 2
    rows = -(-max(1, count) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols if count > 1 else 7, 3.6 * rows if count > 1 else 4.5),
                             squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat)


def _title(panel: tuple) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in panel)


def _plot_rounds(path: Path, variants: list[dict], by_variant: dict, metric_of: dict[str, str],
                 swept: list[str]) -> None:
    from matplotlib.ticker import MaxNLocator

    panels, members = _panels(variants, swept)
    plt, fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels, strict=False):
        for label, variant in members[panel]:
            xs, means, stds = _curve(by_variant[variant["name"]], metric_of[variant["name"]])
            if xs:
                ax.errorbar(xs, means, yerr=stds, marker="o", markersize=3, capsize=2, label=label,
                            linestyle="--" if _baseline(variant) != "federated" else "-")
        ax.set_title(_title(panel) or "global model on the common evaluation set", fontsize=8)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(_ylabel(metric_of, [v for _, v in members[panel]]))
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle("mean ± std over seeds; dashed: baselines", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _heterogeneity_order(partition: str) -> float:
    """IID first, then decreasing alpha (more heterogeneous to the right)."""
    method, alpha = parse_partition(partition)
    return -1e9 if method == "iid" else (-alpha if alpha else 1e9)


def _heterogeneity(path: Path, variants: list[dict], by_variant: dict, metric_of: dict[str, str],
                   swept: list[str]) -> list[str]:
    """Plot final metric vs partition per panel; return the Markdown table of the drop from IID."""
    keys = [k for k in swept if k != "experiment.partition"]
    panels, members = _panels(variants, keys)
    plt, fig, axes = _figure(len(panels))
    table = ["| panel | line | IID | most heterogeneous | drop | relative drop |", "|---|---|---|---|---|---|"]
    for ax, panel in zip(axes, panels, strict=False):
        curves: dict[str, list[tuple[str, list[float]]]] = {}
        for label, variant in members[panel]:
            finals = _finals(by_variant[variant["name"]], metric_of[variant["name"]])
            partition = variant["values"].get("experiment.partition")
            if partition is None:  # the centralized model does not depend on the split
                if finals:
                    ax.axhline(mean_std(finals)[0], linestyle=":", color="gray", label=label)
                continue
            curves.setdefault(label, []).append((partition, finals))
        for label, points in curves.items():
            points = sorted(points, key=lambda p: _heterogeneity_order(p[0]))
            stats = [mean_std(v) for _, v in points]
            ax.errorbar([p for p, _ in points], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        markersize=3, capsize=2, label=label, linestyle="--" if "(" in label or label in BASELINES
                        else "-")
            first, last = stats[0][0], stats[-1][0]
            if len(points) > 1 and points[0][1] and points[-1][1]:
                relative = f"{(first - last) / first * 100:.0f}%" if first else "—"
                table.append(f"| {_title(panel) or 'all'} | {label} | {first:.3f} | {last:.3f} ({points[-1][0]}) | "
                             f"{first - last:+.3f} | {relative} |")
        ax.set_title(_title(panel), fontsize=8)
        ax.set_xlabel("partition (more heterogeneous to the right)")
        ax.set_ylabel(_ylabel(metric_of, [v for _, v in members[panel]]))
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return ["Drop of the final metric from IID to the most heterogeneous split (mean over seeds):", "", *table]


def _task_metrics(keys: list[str]) -> list[str]:
    """The ``<task>/<primary>`` keys of a multi-task metrics dict, in task order."""
    from fedvlm.tasks import TASKS

    return [f"{name}/{task.primary}" for name, task in TASKS.items() if f"{name}/{task.primary}" in keys]


def _plot_radar(path: Path, variants: list[dict], by_variant: dict, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = {v["name"]: [mean_std(_finals(by_variant[v["name"]], k))[0] for k in keys] for v in variants}
    best = [max((m[i] for m in means.values() if not math.isnan(m[i])), default=0.0) for i in range(len(keys))]
    angles = [2 * math.pi * i / len(keys) for i in range(len(keys))]
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"projection": "polar"})
    for name, values in means.items():
        if all(math.isnan(v) for v in values):
            continue
        scaled = [0.0 if math.isnan(v) or not b else v / b for v, b in zip(values, best, strict=True)]
        ax.plot(angles + angles[:1], scaled + scaled[:1], marker="o", markersize=3, label=name)
        ax.fill(angles + angles[:1], scaled + scaled[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([f"{k}\n(best {b:.3g})" for k, b in zip(keys, best, strict=True)], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.35, 1.1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _reach(trial: dict, metric: str, target: float) -> dict[str, float] | None:
    """Round, simulated clock, MB communicated and wall seconds when ``metric`` first reaches ``target``."""
    seconds = 0.0
    for record, megabytes in zip(trial["rounds"], _xs(trial, "mb"), strict=True):
        seconds += record["seconds"]
        if record["metrics"].get(metric, float("-inf")) >= target:
            return {"round": record["round"], "clock": record.get("sim_clock", 0.0), "mb": megabytes,
                    "wall": seconds}
    return None


def _to_target(path: Path, variants: list[dict], by_variant: dict, metric_of: dict[str, str]) -> list[str]:
    table = ["| variant | target | reached | rounds | simulated s | MB up+down | wall s |",
             "|---|---|---|---|---|---|---|"]
    for variant in variants:
        target = variant["config"]["experiment"]["target"]
        done = by_variant[variant["name"]]
        hits = [h for h in (_reach(t, metric_of[variant["name"]], target) for t in done) if h is not None]
        cells = [_fmt([h[k] for h in hits], d) for k, d in (("round", 1), ("clock", 1), ("mb", 2), ("wall", 1))]
        table.append(f"| {variant['name']} | {target:g} | {len(hits)}/{len(done)} | " + " | ".join(cells) + " |")
    plt, fig, axes = _figure(2)
    for ax, x, label in zip(axes, ("mb", "clock"), ("MB communicated (up + down)", "simulated seconds"),
                            strict=True):
        for variant in variants:
            xs, means, stds = _curve(by_variant[variant["name"]], metric_of[variant["name"]], x)
            if xs:
                ax.errorbar(xs, means, yerr=stds, marker="o", markersize=3, capsize=2, label=variant["name"],
                            linestyle="--" if _baseline(variant) != "federated" else "-")
        targets = {v["config"]["experiment"]["target"] for v in variants} - {0.0}
        for target in targets:
            ax.axhline(target, linestyle=":", color="gray")
        ax.set_xlabel(label)
        ax.set_ylabel(_ylabel(metric_of, variants))
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [f"Until {_names(metric_of.values())} first reaches the target (mean ± std over the seeds that reach "
            "it):", "", *table, "", "![metric vs cost](to_target.png)"]


def _straggler_table(variants: list[dict], by_variant: dict) -> list[str]:
    table = ["| variant | stragglers | deadline s | late updates / round | rounds lost | simulated s (total) |",
             "|---|---|---|---|---|---|"]
    for variant in variants:
        exp = variant["config"]["experiment"]
        done = by_variant[variant["name"]]
        if exp["baseline"] != "federated":  # no rounds to wait for: only the simulated time compares
            clock = [t["rounds"][-1].get("sim_clock", 0.0) for t in done if t["rounds"]]
            table.append(f"| {variant['name']} | n/a | n/a | n/a | n/a | {_fmt(clock, 1)} |")
            continue
        late = [statistics.fmean(len(r.get("late", [])) for r in t["rounds"]) for t in done if t["rounds"]]
        lost = [sum(not r.get("aggregated", True) for r in t["rounds"]) for t in done]
        clock = [t["rounds"][-1].get("sim_clock", 0.0) for t in done if t["rounds"]]
        table.append(f"| {variant['name']} | {exp['stragglers']:g} | {exp['round_deadline']:g} | {_fmt(late, 2)} | "
                     f"{_fmt(lost, 1)} | {_fmt(clock, 1)} |")
    return table
