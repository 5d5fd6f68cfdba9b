"""Aggregation speed: the product's server step against a numpy float64 accumulate over the same bytes, same run.

Product: `build(AlgorithmConfig(name=...)).aggregate(base, updates, state, 1)` for FedAvg, FedProx and FedAdam, the
call `RoundDriver._aggregate` makes, with K updates of SIZE MiB of float32 (32 tensors of equal size) whose loaders
return tensors already in memory (no disk: `bench/aggregation_memory.py` measures the daemon's whole path and its
memory). Floor: `np.add(acc, update, out=acc)` into one float64 accumulator per tensor, over the same float32 arrays,
then one division: the least work any float64 mean of these bytes needs. To keep memory small, the K updates cycle
through POOL distinct random updates (each larger than any cache, so reuse does not flatter either side).

Each (algorithm, K) is timed `--repeats` times alternating with the floor; reported: medians, the ratio product /
floor (target <= 1.5) and GB/s of update bytes. Also timed, in the same alternation: the mean alone
(`aggregation.combine`, the part of the step that reads the K updates, the same code for the three algorithms),
whose ratio leaves out the server step's fixed work per round (FedAvg's x + d in the base's dtype, FedAdam's
moments), which the floor does not do. Run it with PYTHONPATH pointing at another tree (laid out as
DIR/fedvlm/...) to measure that tree's aggregation against the same floor.

    python bench/aggregation_speed.py [--size-mb 64] [--ks 2,8,32] [--repeats 3] [--threads 1] [--json PATH]
                                      [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info  # bench/machine.py (scripts run from bench/)

TARGET_RATIO = 1.5
POOL = 4
TENSORS = 32
ALGORITHMS = ("fedavg", "fedprox", "fedadam")


def make_pool(size_mb: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The base and POOL updates (base + noise), each TENSORS float32 tensors totalling `size_mb` MiB."""
    elements = size_mb * (1 << 20) // 4 // TENSORS
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i:02d}.lora_A.weight": torch.randn(elements, generator=g) * 0.02 for i in range(TENSORS)}
    pool = [{n: b + torch.randn(elements, generator=g) * 1e-3 for n, b in base.items()} for _ in range(POOL)]
    return base, pool


def _round(name: str, base, pool, k: int):
    """(algorithm, its initial state, K updates whose loaders return tensors already in memory)."""
    from fedvlm.algorithms import algorithm_config, build
    from fedvlm.algorithms.base import ClientUpdate

    algorithm = build(algorithm_config(name=name))
    updates = [ClientUpdate(10 + i, lambda u=pool[i % POOL]: (dict(u), {})) for i in range(k)]
    return algorithm, algorithm.initial_state(base), updates


def product(name: str, base, pool, k: int) -> float:
    algorithm, state, updates = _round(name, base, pool, k)
    started = time.perf_counter()
    algorithm.aggregate(base, updates, state, 1)
    return time.perf_counter() - started


def mean_only(name: str, base, pool, k: int) -> float:
    from fedvlm.algorithms import aggregation

    algorithm, state, updates = _round(name, base, pool, k)
    started = time.perf_counter()
    aggregation.combine(algorithm.config, base, updates, state, 1)
    return time.perf_counter() - started


def floor(base, pool, k: int) -> float:
    arrays = [{n: t.numpy() for n, t in u.items()} for u in pool]
    started = time.perf_counter()
    acc = {n: np.zeros(t.shape, dtype=np.float64) for n, t in base.items()}
    for i in range(k):
        for n, a in arrays[i % POOL].items():
            np.add(acc[n], a, out=acc[n])
    for a in acc.values():
        a /= k
    return time.perf_counter() - started


def plot(rows: list[dict], path: Path) -> None:
    """Product / floor per K for each algorithm, the mean alone beside them, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in rows})
    names = list(dict.fromkeys(r["algorithm"] for r in rows))
    width = 0.8 / (len(names) + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, name in enumerate(names):
        ratios = [next(r["ratio"] for r in rows if r["algorithm"] == name and r["k"] == k) for k in ks]
        ax.bar([j + i * width for j in range(len(ks))], ratios, width, label=f"{name}: server step")
    means = [statistics.median(r["mean_ratio"] for r in rows if r["k"] == k) for k in ks]
    ax.bar([j + len(names) * width for j in range(len(ks))], means, width, color="grey", label="the mean alone")
    ax.axhline(TARGET_RATIO, color="red", linestyle="--", label=f"target {TARGET_RATIO}x")
    ax.set_xticks([j + len(names) * width / 2 for j in range(len(ks))], [f"K = {k}" for k in ks])
    ax.set_ylabel("time / numpy float64 accumulate")
    ax.set_title(f"aggregation of K x {rows[0]['size_mb']} MiB updates against the floor, same run", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--ks", default="2,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (numpy's add is single-threaded)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--json", type=Path,
                        default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "aggregation_speed.json")
    parser.add_argument("--plot", type=Path, default=None, help="write a bar chart of the ratios (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import fedvlm.algorithms.aggregation as aggregation

    base, pool = make_pool(args.size_mb)
    rows = []
    print(f"aggregation from {aggregation.__file__}; {args.size_mb} MiB per update, torch threads {args.threads}")
    print(f"{'algorithm':>9} {'K':>3} {'product s':>10} {'floor s':>8} {'ratio':>6} {'GB/s':>6} {'mean s':>7} "
          f"{'ratio':>6}  per repeat (product)")
    for k in (int(x) for x in args.ks.split(",")):
        for name in args.algorithms.split(","):
            times, floors, means = [], [], []
            for _ in range(args.repeats):
                floors.append(floor(base, pool, k))
                times.append(product(name, base, pool, k))
                means.append(mean_only(name, base, pool, k))
            ratios = [t / f for t, f in zip(times, floors, strict=True)]
            mean_ratios = [t / f for t, f in zip(means, floors, strict=True)]
            row = {"algorithm": name, "k": k, "size_mb": args.size_mb, "product_s": statistics.median(times),
                   "floor_s": statistics.median(floors), "ratio": statistics.median(ratios), "ratios": ratios,
                   "gb_s": k * args.size_mb * (1 << 20) / statistics.median(times) / 1e9,
                   "mean_s": statistics.median(means), "mean_ratio": statistics.median(mean_ratios),
                   "mean_ratios": mean_ratios}
            rows.append(row)
            print(f"{name:>9} {k:>3} {row['product_s']:>10.3f} {row['floor_s']:>8.3f} {row['ratio']:>6.2f} "
                  f"{row['gb_s']:>6.2f} {row['mean_s']:>7.3f} {row['mean_ratio']:>6.2f}  "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}", flush=True)
    for key, label in (("ratio", "server step"), ("mean_ratio", "mean alone")):
        worst = max(r[key] for r in rows)
        print(f"{label}: worst median ratio {worst:.2f} ({'meets' if worst <= TARGET_RATIO else 'misses'} the "
              f"{TARGET_RATIO} target)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "aggregation_module": aggregation.__file__,
                                     "threads": args.threads, "rows": rows}, indent=2))
    print(f"JSON: {args.json}")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
