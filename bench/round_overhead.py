"""Round overhead: a round's wall time minus its slowest site's training, on a real 3-site federation.

A real `fedvlm-coord serve` daemon (tests/harness.py `Coordinator`) and three `fedvlm-client` processes on 127.0.0.1
(mutual TLS), the built-in tiny LLaVA (`tiny-llava`), LoRA r8 on q/v + the connector (F-CL; `--update 64mib`: rank
4096 on every linear layer of the language model, a 64.1 MiB update each way), the built-in digits split
over the three sites (a small test split, so that the evaluation each site runs on every global stays small),
`max_steps` optimizer steps per local round. Everything comes from the coordinator's own records, read with
`fedvlm-coord rounds --json` after the run: round r's wall time is from global r-1's publication to global r's,
its slowest training is the largest `training[].seconds` the sites reported for r, and the overhead is the
difference (it holds: the site learning of the round, downloading and verifying the global, evaluating it on the
local test split, signing and uploading the update, the coordinator's checks, aggregation and signing). Round 1 is
reported apart (it also holds the sites' model build, unless it was done while they waited). The update's size is
the stored global's (`global_bytes`).

    python bench/round_overhead.py [--rounds 6] [--max-steps 4] [--update small|64mib] [--sites 3] [--json PATH]
                                   [--plot PATH] [--baseline-pythonpath DIR]

`--sites N` changes how many sites train (issue 12's federation has 3); with `--sites 1` a site and the daemon
have about a core each, as on sites with hosts of their own, instead of three sites sharing the machine's cores.

`--baseline-pythonpath DIR` runs the same federation first with the coordinator and the sites from DIR (a tree laid
out as DIR/fedvlm/{coordinator,client,...}, e.g. the commit before a change) and reports both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info  # bench/machine.py (scripts run from bench/)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/harness.py
# --update: LoRA rank and targets, and issue 12's overhead target for that size. "64mib": rank 4096 on every linear
# layer of the tiny LLaVA's language model (2,048 x 4,096 values a layer, 2 layers) plus the connector, 64.1 MiB each
# way: the bytes of a real model's adapter on the tiny model's compute.
UPDATES = {"small": (8, ["q_proj", "v_proj"], 0.2), "64mib": (4096, ["all-linear"], 1.5)}
SITES = 3  # issue 12's federation

CONFIG = """
name = "bench-rounds"
[run]
rounds = {rounds}
min_clients = {sites}
clients_per_round = {sites}
quorum = {sites}
round_deadline = "10m"
poll_interval = "1s"
heartbeat_timeout = "60s"
final_eval = false
[task]
model = "tiny-llava"
strategy = "F-CL"
[task.lora]
r = {lora_r}
targets = {lora_targets}
[task.train]
max_steps = {max_steps}
"""


def run_federation(work: Path, config: str, pythonpath: str | None, data: list[Path], cache: Path) -> dict:
    """One federation to its end; returns per-round wall, slowest training and overhead (coordinator records)."""
    from tests.harness import Coordinator, coord_cli, start_sites, wait_sites_ok

    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, saved]))
    started = time.time()
    coord = Coordinator(work / "coord", config)
    try:
        coord.start()
        sites = start_sites(coord, data, work, cache)
        wait_sites_ok(sites, work, timeout=600)
    finally:
        coord.kill()
        if pythonpath:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
    rows = json.loads(coord_cli("rounds", "--dir", str(coord.fed.root), "--json"))
    return {"rounds": per_round(rows), "seconds": time.time() - started, "pythonpath": pythonpath or ""}


def per_round(rows: list[dict]) -> list[dict]:
    """Round r >= 1: wall = published(r) - published(r-1), slowest training, overhead = wall - slowest."""
    published = {r["round"]: r["finished_unix"] for r in rows}
    out = []
    for row in rows:
        if row["round"] == 0:
            continue
        wall = row["finished_unix"] - published[row["round"] - 1]
        slowest = max((t["seconds"] for t in row["training"]), default=0.0)
        out.append({"round": row["round"], "wall_s": wall, "slowest_train_s": slowest, "overhead_s": wall - slowest,
                    "steps": [t["steps"] for t in row["training"]], "global_bytes": row.get("global_bytes")})
    return out


def summary(result: dict) -> dict:
    later = [r["overhead_s"] for r in result["rounds"] if r["round"] >= 2]
    return {"median_overhead_s": statistics.median(later), "max_overhead_s": max(later),
            "round1_overhead_s": result["rounds"][0]["overhead_s"],
            "update_bytes": result["rounds"][0]["global_bytes"],  # a global has an update's names and shapes
            "median_wall_s": statistics.median(r["wall_s"] for r in result["rounds"] if r["round"] >= 2),
            "median_slowest_train_s": statistics.median(r["slowest_train_s"] for r in result["rounds"]
                                                        if r["round"] >= 2)}


def print_table(name: str, result: dict, target: float) -> None:
    print(f"\n{name}  ({result['pythonpath'] or 'this tree'}; {result['seconds']:.0f}s in all)")
    print(f"{'round':>5} {'wall s':>8} {'slowest train s':>16} {'overhead s':>11}")
    for r in result["rounds"]:
        print(f"{r['round']:>5} {r['wall_s']:>8.3f} {r['slowest_train_s']:>16.3f} {r['overhead_s']:>11.3f}")
    s = result["summary"]
    verdict = "meets" if s["median_overhead_s"] <= target else "misses"
    size = f"{s['update_bytes'] / 2**20:.2f} MiB updates" if s["update_bytes"] else "update size not recorded"
    print(f"median overhead, rounds 2..N: {s['median_overhead_s']:.3f}s ({verdict} the {target:g}s target for "
          f"{size}); round 1: {s['round1_overhead_s']:.3f}s")


def plot(results: dict, path: Path, target: float, sites: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, result in results.items():
        rounds = [r["round"] for r in result["rounds"]]
        ax.plot(rounds, [r["overhead_s"] for r in result["rounds"]], marker="o", label=f"{name}: overhead")
        ax.plot(rounds, [r["slowest_train_s"] for r in result["rounds"]], linestyle=":", marker=".",
                label=f"{name}: slowest training")
    ax.axhline(target, color="grey", linewidth=0.8, linestyle="--", label=f"target {target:g}s")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    size = results["fedvlm"]["summary"]["update_bytes"]  # a baseline tree may predate `global_bytes`
    ax.set_title(f"Round overhead = wall - slowest training ({sites} site{'s' if sites > 1 else ''}, tiny LLaVA, mTLS"
                 + (f", {size / 2**20:.1f} MiB updates)" if size else ")"), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--update", choices=sorted(UPDATES), default="small",
                        help="small: LoRA r8 on q/v + connector (130 KB); 64mib: r4096 on every linear layer")
    parser.add_argument("--baseline-pythonpath", type=Path, default=None)
    parser.add_argument("--sites", type=int, default=SITES, help=f"sites training each round (default {SITES})")
    parser.add_argument("--json", type=Path,
                        default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "round_overhead.json")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (the median is over rounds 2..N)")
    if args.sites < 1:
        parser.error("--sites must be >= 1")
    from fedvlm.data.digits import build_digits
    from fedvlm.vlm.presets import preset_dir
    from tests.harness import small_sites

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedvlm-rounds-"))
    cache = work / "cache"
    os.environ["FEDVLM_CACHE"] = str(cache)
    preset_dir("tiny-llava")  # built once here, not by the sites racing
    digits = build_digits(work / "digits", sites=args.sites).root
    data = small_sites(digits, work, args.sites, train=64, test=8)
    lora_r, lora_targets, target_s = UPDATES[args.update]
    config = CONFIG.format(rounds=args.rounds, sites=args.sites, max_steps=args.max_steps, lora_r=lora_r,
                           lora_targets=json.dumps(lora_targets))
    results = {}
    if args.baseline_pythonpath:
        results["baseline"] = run_federation(work / "baseline", config, str(args.baseline_pythonpath.resolve()),
                                             data, cache)
    results["fedvlm"] = run_federation(work / "fedvlm", config, None, data, cache)
    for name, result in results.items():
        result["summary"] = summary(result)
        print_table(name, result, target_s)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "rounds": args.rounds, "max_steps": args.max_steps,
                                     "sites": args.sites, "update": args.update, "target_s": target_s,
                                     "results": results}, indent=2))
    print(f"\nJSON: {args.json}")
    if args.plot:
        plot(results, args.plot, target_s, args.sites)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
