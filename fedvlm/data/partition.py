"""Split a dataset across sites: IID, Dirichlet label skew, quantity skew, split by an attribute, one task per site.

The partitioners are pure functions of (labels or size, number of sites, parameters, seed) and return one sorted
list of record indices per site. Every one guarantees: deterministic in ``seed``; every index is assigned to exactly
one site (the lists are disjoint and their union is ``range(n)``). Statistics (label histograms, Jensen-Shannon
divergence from the global label distribution) are pure functions too; ``write_partition`` and ``write_report`` are
the I/O edges used by ``fedvlm data partition``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

METHODS = ("iid", "dirichlet", "quantity", "attribute", "task")

# ---- partitioners (pure) -------------------------------------------------------------------------------------


def iid(n: int, sites: int, seed: int) -> list[list[int]]:
    """A seeded shuffle dealt round-robin: site sizes differ by at most one."""
    _check_sites(sites)
    order = np.random.default_rng(seed).permutation(n)
    return [sorted(int(i) for i in order[s::sites]) for s in range(sites)]


def dirichlet_label_skew(labels: Sequence[object], sites: int, alpha: float, seed: int,
                         min_per_site: int = 1, max_tries: int = 100) -> list[list[int]]:
    """Label skew (Hsu et al., 2019): for each label, its records are split across sites in proportions drawn from
    ``Dirichlet(alpha * 1)``. Small ``alpha`` (0.1) gives sites dominated by a few labels; large (100) is close to
    IID. The draw is repeated (same seeded generator) until every site has at least ``min_per_site`` records, up
    to ``max_tries`` times (then the last draw is kept)."""
    _check_sites(sites)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    by_label: dict[object, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    keys = sorted(by_label, key=str)
    parts: list[list[int]] = [[] for _ in range(sites)]
    for _ in range(max_tries):
        parts = [[] for _ in range(sites)]
        for key in keys:
            members = np.array(by_label[key])
            rng.shuffle(members)
            proportions = rng.dirichlet(np.full(sites, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).round().astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min(min_per_site, len(labels) // sites):
            break
    return [sorted(p) for p in parts]


def quantity_skew(n: int, sites: int, alpha: float, seed: int, min_per_site: int = 1) -> list[list[int]]:
    """Quantity skew: site sizes proportional to a ``Dirichlet(alpha * 1)`` draw (at least ``min_per_site`` each when
    ``n`` allows), records dealt IID. Small ``alpha`` gives very unequal sizes."""
    _check_sites(sites)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    floor = min(min_per_site, n // sites)
    proportions = rng.dirichlet(np.full(sites, alpha))
    sizes = np.floor(proportions * (n - floor * sites)).astype(int) + floor
    for i in np.argsort(-proportions)[: n - int(sizes.sum())]:  # hand out the rounding remainder
        sizes[i] += 1
    order = rng.permutation(n)
    cuts = np.cumsum(sizes)[:-1]
    return [sorted(int(i) for i in chunk) for chunk in np.split(order, cuts)]


def by_attribute(values: Sequence[object], sites: int | None = None) -> tuple[list[list[int]], list[list[object]]]:
    """Split by an attribute value: the distinct values (sorted as strings) are dealt round-robin to ``sites``
    sites (default: one site per value). Returns the index lists and the values each site holds."""
    distinct = sorted(set(values), key=str)
    sites = len(distinct) if sites is None else sites
    _check_sites(sites)
    if sites > len(distinct):
        raise ValueError(f"{sites} sites but only {len(distinct)} distinct values ({distinct[:10]})")
    owner = {value: i % sites for i, value in enumerate(distinct)}
    parts: list[list[int]] = [[] for _ in range(sites)]
    for i, value in enumerate(values):
        parts[owner[value]].append(i)
    held = [[v for v in distinct if owner[v] == s] for s in range(sites)]
    return parts, held


def _check_sites(sites: int) -> None:
    if sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")


# ---- statistics (pure) ---------------------------------------------------------------------------------------


def label_histograms(labels: Sequence[object], parts: Sequence[Sequence[int]]) -> tuple[list[str], np.ndarray]:
    """``(classes, counts)``: the sorted distinct labels (as strings) and a sites x classes count matrix."""
    classes = sorted({str(v) for v in labels}, key=_natural)
    column = {c: j for j, c in enumerate(classes)}
    counts = np.zeros((len(parts), len(classes)), dtype=np.int64)
    for s, part in enumerate(parts):
        for i in part:
            counts[s, column[str(labels[i])]] += 1
    return classes, counts


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (base 2, so in [0, 1]) between two count or probability vectors."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def heterogeneity(counts: np.ndarray) -> tuple[list[float], float]:
    """Per-site JS divergence from the global label distribution (empty sites count as 0) and their mean."""
    total = counts.sum(axis=0)
    per_site = [js_divergence(row, total) if row.sum() > 0 else 0.0 for row in counts]
    return per_site, float(np.mean(per_site)) if per_site else 0.0


def _natural(value: str) -> tuple:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


# ---- records and labels --------------------------------------------------------------------------------------


def record_key(record: dict, key: str) -> object:
    """The partition label of a record: ``record[key]`` (lists become tuples), or for ``answer`` the first gpt
    turn's text. ``KeyError`` naming the key when absent."""
    if key == "answer" and "answer" not in record:
        for turn in record.get("conversations", []):
            if isinstance(turn, dict) and str(turn.get("from", "")).lower() in ("gpt", "assistant"):
                return str(turn.get("value", "")).strip()
        raise KeyError("answer")
    value = record[key]
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class Partition:
    """The result of ``partition_records``: index lists per site and, for attribute splits, the values held."""

    method: str
    parts: list[list[int]]
    held: list[list[object]] | None = None


def partition_records(records: Sequence[dict], method: str, sites: int, seed: int = 0, alpha: float = 0.5,
                      key: str = "answer") -> Partition:
    """Dispatch to a partitioner by ``method`` (one of ``METHODS``); ``task`` is ``attribute`` on key ``task``
    with one site per task. ``ValueError`` naming the record when a needed key is missing."""
    if method == "iid":
        return Partition(method, iid(len(records), sites, seed))
    if method == "quantity":
        return Partition(method, quantity_skew(len(records), sites, alpha, seed))
    if method == "task":
        key = "task"
    labels = _labels(records, key)
    if method == "dirichlet":
        return Partition(method, dirichlet_label_skew(labels, sites, alpha, seed))
    if method in ("attribute", "task"):
        parts, held = by_attribute(labels, sites)
        return Partition(method, parts, held)
    raise ValueError(f"unknown partition method {method!r} (known: {', '.join(METHODS)})")


def _labels(records: Sequence[dict], key: str) -> list[object]:
    labels = []
    for i, record in enumerate(records):
        try:
            labels.append(record_key(record, key))
        except (KeyError, TypeError):
            raise ValueError(f"record {i} (id {record.get('id', i)!r}): no field {key!r} to partition on") from None
    return labels


# ---- I/O edges -----------------------------------------------------------------------------------------------


def write_site(folder: Path, name: str, records: Sequence[dict], source_dir: Path) -> None:
    """Write ``records`` as ``folder/name`` with their images copied (hard-linked when possible) from
    ``source_dir`` to the same relative paths, so the site folder is self-contained."""
    from fedvlm.data.scenes import write_json

    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        src = source_dir / record["image"]
        dst = folder / record["image"]
        if not src.is_file():
            raise ValueError(f"{source_dir}: record {record.get('id')!r}: field 'image': {record['image']!r} not found")
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    write_json(folder / name, list(records))


def write_partition(train_json: Path, out: Path, method: str, sites: int, seed: int = 0, alpha: float = 0.5,
                    key: str = "answer", test_json: Path | None = None) -> dict:
    """Partition ``train_json`` into ``out/site_<i>/train.json`` (+ images) and write the report; returns it.

    With ``test_json``, every site also gets a ``test.json``: the test records split the same way for
    ``attribute``/``task`` (a site tests on the values it trains on), IID otherwise (each site tests on a slice of
    the global distribution; the slices are disjoint and cover the test file).
    """
    train_json, out = Path(train_json), Path(out)
    records = json.loads(train_json.read_text(encoding="utf-8"))
    result = partition_records(records, method, sites, seed=seed, alpha=alpha, key=key)
    test_parts: list[list[int]] | None = None
    test_records: list[dict] = []
    if test_json is not None:
        test_records = json.loads(Path(test_json).read_text(encoding="utf-8"))
        if result.held is not None:
            values = _labels(test_records, "task" if method == "task" else key)
            test_parts = [[i for i, v in enumerate(values) if v in held] for held in result.held]
        else:
            test_parts = iid(len(test_records), len(result.parts), seed)
    for s, part in enumerate(result.parts):
        site = out / f"site_{s}"
        write_site(site, "train.json", [records[i] for i in part], train_json.parent)
        if test_parts is not None:
            write_site(site, "test.json", [test_records[i] for i in test_parts[s]], Path(test_json).parent)
    hist_key = "task" if method == "task" else key
    try:
        labels = _labels(records, hist_key)
    except ValueError:
        labels = _labels(records, "answer")
        hist_key = "answer"
    report = partition_report(labels, result.parts, method=method, key=hist_key, alpha=alpha, seed=seed)
    write_report(out, report)
    return report


def partition_report(labels: Sequence[object], parts: Sequence[Sequence[int]], method: str, key: str,
                     alpha: float, seed: int) -> dict:
    """The report as plain data: per-site sizes, label histograms and JS divergences, and their mean."""
    classes, counts = label_histograms(labels, parts)
    per_site, mean_js = heterogeneity(counts)
    return {"method": method, "key": key, "alpha": alpha if method in ("dirichlet", "quantity") else None,
            "seed": seed, "classes": classes, "sizes": [len(p) for p in parts], "counts": counts.tolist(),
            "js_divergence": per_site, "mean_js_divergence": mean_js}


def write_report(out: Path, report: dict) -> None:
    """``out/partition.json``, ``out/partition.md`` (table) and the PNG heat map and heterogeneity figure."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "partition.md").write_text(report_markdown(report))
    plot_heatmap(report, out / "label_heatmap.png")
    plot_heterogeneity(report, out / "heterogeneity.png")


def report_markdown(report: dict) -> str:
    """A Markdown table: one row per site with its size, JS divergence and count per label."""
    classes = report["classes"]
    head = ["site", "records", "JS div."] + [str(c) for c in classes]
    lines = [f"Partition `{report['method']}` on `{report['key']}`"
             + (f", alpha {report['alpha']}" if report["alpha"] is not None else "")
             + f", seed {report['seed']}; mean JS divergence from the global label distribution: "
             + f"{report['mean_js_divergence']:.3f}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, (size, js, row) in enumerate(zip(report["sizes"], report["js_divergence"], report["counts"],
                                            strict=True)):
        lines.append("| " + " | ".join([f"site_{s}", str(size), f"{js:.3f}"] + [str(v) for v in row]) + " |")
    return "\n".join(lines) + "\n"


def plot_heatmap(report: dict, path: Path, title: str | None = None) -> None:
    """Sites x labels heat map of the record counts, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(report["counts"])
    classes = report["classes"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(classes) + 2), max(2.5, 0.45 * len(counts) + 1.5)))
    image = ax.imshow(counts, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(classes)), [str(c)[:12] for c in classes], rotation=45 if len(classes) > 12 else 0)
    ax.set_yticks(range(len(counts)), [f"site_{s}" for s in range(len(counts))])
    ax.set_xlabel(report["key"])
    if counts.size <= 200:
        top = counts.max() if counts.size else 0
        for (s, c), v in np.ndenumerate(counts):
            ax.text(c, s, str(v), ha="center", va="center", fontsize=7, color="black" if v > top * 0.6 else "white")
    fig.colorbar(image, ax=ax, label="records")
    alpha = f", alpha={report['alpha']}" if report["alpha"] is not None else ""
    ax.set_title(title or f"{report['method']}{alpha}: mean JS = {report['mean_js_divergence']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_heterogeneity(report: dict, path: Path) -> None:
    """Bar chart of each site's JS divergence from the global label distribution, with the mean as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    js = report["js_divergence"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(js) + 2), 3))
    ax.bar([f"site_{s}" for s in range(len(js))], js, color="tab:blue")
    ax.axhline(report["mean_js_divergence"], color="tab:red", linestyle="--",
               label=f"mean {report['mean_js_divergence']:.3f}")
    ax.set_ylim(0, max(0.05, max(js, default=0) * 1.2))
    ax.set_ylabel("JS divergence (bits)")
    ax.set_title("label heterogeneity: JS divergence from the global distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dirichlet_sweep(labels: Sequence[object], sites: int, alphas: Sequence[float], seeds: Sequence[int]) -> list[
        tuple[float, float]]:
    """``(alpha, mean JS divergence averaged over seeds)`` for each alpha: how skew grows as alpha shrinks."""
    out = []
    for alpha in alphas:
        values = []
        for seed in seeds:
            _, counts = label_histograms(labels, dirichlet_label_skew(labels, sites, alpha, seed))
            values.append(heterogeneity(counts)[1])
        out.append((float(alpha), float(np.mean(values))))
    return out


def plot_sweep(sweep: Sequence[tuple[float, float]], path: Path, iid_value: float | None = None) -> None:
    """Mean JS divergence against Dirichlet alpha (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([a for a, _ in sweep], [v for _, v in sweep], marker="o", label="Dirichlet label skew")
    if iid_value is not None:
        ax.axhline(iid_value, color="gray", linestyle="--", label=f"IID ({iid_value:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("mean JS divergence (bits)")
    ax.set_title("heterogeneity vs Dirichlet concentration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


