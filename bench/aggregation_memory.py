"""Aggregation memory: peak memory of the coordinator's streaming aggregation over K updates, and its time against
a memory-bandwidth floor measured in the same run.

33 files of 64 MiB (float32, 8 tensors of 8 MiB; file 0 is the round's base global, files 1..K the updates) are
written once in a blob-store layout and reused by later runs. For each K and each code path a fresh child process
builds a real state database (one run in round 1, K accepted updates) and runs one phase:

  fedavg_fn  `fedvlm.algorithms.fedavg.fedavg` over `adapters.iter_file_tensors` of the K blob files, one tensor of
             one update at a time (the pure streaming FedAvg);
  round      `RoundDriver._aggregate` itself, the product path: base global and updates loaded through the driver's
             loaders, the run's `Algorithm.aggregate` (FedAvg, mean aggregator), serialisation of the new global,
             its fsync'd blob, the signed global record and the audit entry;
  algorithm  (optional) only the `Algorithm.aggregate` part of `round`;
  floor      (with the first phase) one `acc.add_(t)` pass over K float32 tensors of 64 MiB already in memory.

Memory comes from /proc/self/status, sampled every 2 ms: RssAnon (heap, tensors) and RssFile (resident pages of
mapped files: iter_file_tensors memory-maps the blobs, so those pages are page cache, shared and reclaimable), plus
VmHWM, the kernel's exact peak of RSS (reset at the start of the phase through /proc/self/clear_refs). Each phase
runs under two allocator modes: "default" (glibc as the daemon runs it; freed blocks may stay in the heap) and
"live" (MALLOC_MMAP_THRESHOLD_=1 MiB: every large block is its own mapping, returned on free, so RSS follows what
the code holds). The update files are read once before each child so every K starts from a warm page cache.
A non-streaming aggregator (`--robust median` by default, at `--robust-ks`) is run through `round` for contrast.

    python bench/aggregation_memory.py [--ks 2,8,32] [--phases fedavg_fn,round] [--json PATH] [--plot PATH]

`--product-pythonpath DIR` runs the children against another source tree (A/B of a patch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import machine_info  # bench/machine.py (scripts run from bench/)

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TENSORS_PER_UPDATE = 8
STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def status_kib() -> dict[str, int]:
    """Current VmHWM / VmRSS / RssAnon / RssFile of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0])
    return out


class PeakSampler:
    """Samples /proc/self/status every `interval` s; `phase()` resets VmHWM and the sampled maxima."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peak: dict[str, int] = {}
        self.samples = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = status_kib()
            with self._lock:
                for k in ("RssAnon", "RssFile", "VmRSS"):
                    self._peak[k] = max(self._peak.get(k, 0), now[k])
                self.samples += 1
            self._stop.wait(self.interval)

    def start(self) -> PeakSampler:
        self._thread.start()
        return self

    def phase(self) -> dict[str, int]:
        """Start a new phase: reset the kernel's VmHWM and our maxima; returns the status at the start."""
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        now = status_kib()
        with self._lock:
            self._peak = {k: now[k] for k in ("RssAnon", "RssFile", "VmRSS")}
        return now

    def peaks(self) -> dict[str, int]:
        """Peaks since the last `phase()`: sampled RssAnon / RssFile / VmRSS and the kernel's VmHWM (KiB)."""
        now = status_kib()
        with self._lock:
            out = {f"peak_{k}": max(v, now[k]) for k, v in self._peak.items()}
        out["VmHWM"] = now["VmHWM"]
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------- update files

def prepare_updates(folder: Path, count: int, update_mb: int) -> list[dict]:
    """`count` distinct update files of `update_mb` MiB in a blob-store layout (<2 hex>/<sha256>), written once
    (later runs reuse them and add only the missing ones). Entry 0 serves as the round's base global."""
    import hashlib

    import torch

    from fedvlm import adapters

    index_path = folder / f"index-{update_mb}MiB.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else []
    index = [e for e in index if (folder / "blobs" / e["digest"][:2] / e["digest"]).exists()]
    if len(index) >= count:
        return index[:count]
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    cols = 1024
    rows = update_mb * MIB // TENSORS_PER_UPDATE // 4 // cols
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.self_attn.q_proj.lora_A.weight": torch.randn(rows, cols, generator=gen)
            for i in range(TENSORS_PER_UPDATE)}
    for k in range(len(index), count):
        tmp = folder / "blobs" / f".update-{k}.tmp"
        adapters.save_file_atomic({n: t + 0.01 * k for n, t in base.items()}, tmp)
        h = hashlib.sha256()
        with open(tmp, "rb") as fh:
            while block := fh.read(4 * MIB):
                h.update(block)
        digest = h.hexdigest()
        target = folder / "blobs" / digest[:2] / digest
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp, target)
        index.append({"client": f"site-{k:03d}", "digest": digest, "num_examples": 10 + 7 * k,
                      "bytes": target.stat().st_size})
        index_path.write_text(json.dumps(index, indent=1))
    return index


def warm(folder: Path, entries: list[dict]) -> None:
    for e in entries:
        with open(folder / "blobs" / e["digest"][:2] / e["digest"], "rb") as fh:
            while fh.read(16 * MIB):
                pass


# ---------------------------------------------------------------------------------------------------- child

def child(folder: Path, index: Path, k: int, out: Path, aggregator: str, phases: list[str]) -> None:
    """One K in a fresh process: the requested phases (fedavg_fn, algorithm, round, floor); JSON to `out`."""
    import resource

    import torch

    from fedvlm import adapters
    from fedvlm.algorithms import build
    from fedvlm.algorithms.base import ClientUpdate, split_aux
    from fedvlm.algorithms.fedavg import fedavg
    from fedvlm.coordinator.blobs import BlobStore
    from fedvlm.coordinator.config import FederationConfig, RunConfig
    from fedvlm.coordinator.rounds import RoundDriver
    from fedvlm.coordinator.state import Activity, State
    from fedvlm.security import pki, signing
    from fedvlm.security.signing import UpdateManifest
    from fedvlm.spec import TaskSpec

    all_entries = json.loads(index.read_text())
    base_entry, entries = all_entries[0], all_entries[1:k + 1]  # file 0 is the round's base global
    tmp = Path(tempfile.mkdtemp(prefix=f"agg-k{k}-", dir=folder))
    blobs = BlobStore(folder / "blobs")
    state = State(tmp / "state.db")
    task = TaskSpec.from_dict({"algorithm": {"aggregator": aggregator}}) if aggregator != "mean" else TaskSpec()
    config = FederationConfig(run=RunConfig(rounds=1, min_clients=k, clients_per_round=k, quorum=k,
                                            final_eval=False), task=task)
    driver = RoundDriver(state, blobs, config, "bench", pki.generate_key())

    def accept(run_id: str, number: int, client: str, digest: str, num_examples: int, base_digest: str) -> None:
        # An update accepted through the state's transitions, without Intake's copy and checks of 64 MiB files.
        manifest = UpdateManifest(federation_id="bench", run_id=run_id, round=number, client=client,
                                  base_digest=base_digest, sha256=digest, size=blobs.path(digest).stat().st_size,
                                  num_examples=num_examples, nonce=signing.new_nonce(), created_at=time.time())
        upload_id = manifest.nonce
        state.announce_upload(upload_id, manifest, manifest.to_json(), b"")
        state.accept_update(upload_id, digest)

    # Round 1 of a real run: file 0 adopted as global 0 by the driver, the K sites sampled, their updates accepted.
    run = driver.ensure_run()
    state.claim_init(run.run_id, "site-init")
    accept(run.run_id, 0, "site-init", base_entry["digest"], 1, signing.INITIAL_BASE)
    for e in entries:  # enrolled and live, so that the driver samples them
        token_id = e["client"]
        state.issue_token(token_id, e["client"], b"", time.time() + 3600)
        state.enroll_client(token_id, e["client"], "bench")
        state.record_heartbeat(e["client"], Activity.IDLE, "", 0, 0)
    driver.tick()
    base = base_entry["digest"]
    for e in entries:
        accept(run.run_id, 1, e["client"], e["digest"], e["num_examples"], base)
    run = state.current_run()
    rnd = state.round(run.run_id, 1)
    accepted = [e["client"] for e in entries]

    sampler = PeakSampler().start()
    result: dict = {"k": k, "aggregator": aggregator, "update_bytes": entries[0]["bytes"],
                    "total_bytes": sum(e["bytes"] for e in entries), "torch_threads": torch.get_num_threads()}
    result["start"] = sampler.phase()

    def measure(name: str, fn) -> None:
        result[f"before_{name}"] = sampler.phase()
        t0 = time.perf_counter()
        fn()
        result[f"{name}_seconds"] = time.perf_counter() - t0
        result[name] = sampler.peaks()

    def fedavg_fn() -> None:
        # fedvlm.algorithms.fedavg.fedavg over iter_file_tensors: one tensor of one update at a time.
        updates = state.accepted_updates(run.run_id, run.round)
        merged = fedavg((u.num_examples, adapters.iter_file_tensors(blobs.path(u.digest))) for u in updates)
        del merged

    def algorithm_step() -> None:
        # The math of RoundDriver._aggregate: the run's Algorithm.aggregate over deferred loaders of the blobs.
        updates = state.accepted_updates(run.run_id, run.round)
        algorithm = build(run.task.algorithm)
        base_tensors, _ = split_aux(dict(adapters.iter_file_tensors(blobs.path(base))))
        loaders = [ClientUpdate(u.num_examples, driver._loader(u.digest)) for u in updates]
        res = algorithm.aggregate(base_tensors, loaders, algorithm.initial_state(base_tensors), run.round)
        del res

    def round_close() -> None:
        # RoundDriver._aggregate itself: the algorithm, serialisation, fsync'd global blob, signed record, audit.
        driver._aggregate(run, rnd, accepted)
        digest = state.round(run.run_id, 1).global_digest
        result["global_bytes"] = blobs.path(digest).stat().st_size
        blobs.path(digest).unlink()  # the benchmark's only output blob; the update files stay for the next K

    for name, fn in (("fedavg_fn", fedavg_fn), ("algorithm", algorithm_step), ("round", round_close)):
        if name in phases:
            measure(name, fn)

    if "floor" in phases:
        # Memory-bandwidth floor over the same number of bytes, in memory (allocation is not timed).
        n = result["update_bytes"] // 4
        tensors = [torch.full((n,), float(i)) for i in range(k)]
        acc = torch.zeros(n)
        result["before_floor"] = sampler.phase()
        floors = []
        for _ in range(3):
            acc.zero_()
            t0 = time.perf_counter()
            for t in tensors:
                acc.add_(t)
            floors.append(time.perf_counter() - t0)
        result["floor_seconds"] = statistics.median(floors)  # median of 3, like the single-shot phases it scales
        result["floor_best_seconds"] = min(floors)
        result["floor_all_seconds"] = floors
        del tensors, acc
    sampler.stop()
    result["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["samples"] = sampler.samples
    state.close()
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- report

PHASES = {
    "fedavg_fn": "fedavg() over iter_file_tensors",
    "algorithm": "Algorithm.aggregate (mean)",
    "round": "RoundDriver._aggregate",
}
# "default": the allocator as the daemon runs it. "live": glibc told to serve every block >= 1 MiB with its own mmap
# and to give it back on free, so RSS follows what the code holds rather than what malloc keeps for later.
MODES = {"default": {}, "live": {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}}


def _mib(kib: float) -> float:
    return kib / 1024


def above(r: dict, phase: str) -> dict[str, float]:
    """A phase's peaks above the child's state just before that phase, in MiB."""
    before = r[f"before_{phase}"]
    peaks = r[phase]
    return {"anon": _mib(peaks["peak_RssAnon"] - before["RssAnon"]),
            "file": _mib(peaks["peak_RssFile"] - before["RssFile"]),
            "hwm": _mib(peaks["VmHWM"] - before["VmRSS"])}


def slope(per_k: list[dict], mode: str, phase: str) -> float:
    """Growth of the peak RssAnon per extra update, in MiB, between the smallest and the largest K."""
    lo, hi = per_k[0], per_k[-1]
    return (above(hi[mode], phase)["anon"] - above(lo[mode], phase)["anon"]) / max(1, hi["k"] - lo["k"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_k, phases = results["per_k"], results["phases"]
    ks = [r["k"] for r in per_k]
    update_mib = results["update_bytes"] / MIB
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.5, 4.8))
    colors = {"fedavg_fn": "#1f77b4", "algorithm": "#2ca02c", "round": "#d62728"}
    for phase in phases:
        if "live" in results["modes"]:
            ax1.plot(ks, [above(r["live"], phase)["anon"] for r in per_k], "o-", color=colors[phase],
                     label=f"{PHASES[phase]}: peak RssAnon, live")
        if "default" in results["modes"]:
            ax1.plot(ks, [above(r["default"], phase)["anon"] for r in per_k], "^--", color=colors[phase], alpha=0.6,
                     label=f"{PHASES[phase]}: peak RssAnon, default malloc")
    robust = results.get("robust") or []
    if robust:
        ax1.plot([r["k"] for r in robust], [above(r, "round")["anon"] for r in robust], "s-", color="#9467bd",
                 label=f"RoundDriver._aggregate, aggregator={robust[0]['aggregator']} (keeps all K deltas)")
    ax1.plot(ks, [k * update_mib for k in ks], ":", color="grey", label="K x update size")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log", base=2)
    ax1.set_xticks(ks, [str(k) for k in ks])
    ax1.set_xlabel("K updates aggregated")
    ax1.set_ylabel("MiB above the process before the phase")
    ax1.set_title(f"peak anonymous memory per K ({update_mib:.0f} MiB float32 updates): flat = streaming", fontsize=9)
    ax1.legend(fontsize=6.2, loc="upper left")

    mode = "default" if "default" in results["modes"] else results["modes"][0]
    bars = [("floor", "floor: acc.add_(t) over K x 64 MiB in memory", "#7f7f7f")] + [
        (p, PHASES[p], colors[p]) for p in phases]
    width = 0.8 / len(bars)
    xs = list(range(len(ks)))
    for i, (key, label, color) in enumerate(bars):
        offs = [x + (i - (len(bars) - 1) / 2) * width for x in xs]
        vals = [r[mode][f"{key}_seconds"] for r in per_k]
        ax2.bar(offs, vals, width, color=color, label=label)
        if key != "floor":
            for x, r in zip(offs, per_k, strict=True):
                ratio = r[mode][f"{key}_seconds"] / r[mode]["floor_seconds"]
                ax2.text(x, r[mode][f"{key}_seconds"], f"{ratio:.0f}x", ha="center", va="bottom", fontsize=6.5)
    ax2.set_xticks(xs, [f"K={k}" for k in ks])
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds (labels: multiple of the floor)")
    ax2.set_title(f"time against the memory-bandwidth floor ({mode} malloc, same run)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_child(data: Path, index: Path, k: int, aggregator: str, phases: list[str], pythonpath: str,
              mode: str) -> dict:
    out = data / f"result-k{k}-{aggregator}.json"
    env = dict(os.environ, PYTHONPATH=pythonpath, **MODES[mode])
    subprocess.run([sys.executable, __file__, "--child", str(k), "--data", str(data), "--index", str(index),
                    "--aggregator", aggregator, "--phases", ",".join(phases), "--out", str(out)], check=True, env=env)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:  # noqa: C901 - argument handling, runs, table
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="2,8,32", help="comma-separated numbers of updates")
    parser.add_argument("--update-mb", type=int, default=64)
    parser.add_argument("--phases", default="fedavg_fn,round",
                        help="code paths to measure, each in a fresh process per K and mode: fedavg_fn, "
                             "algorithm (Algorithm.aggregate only), round (RoundDriver._aggregate)")
    parser.add_argument("--modes", default="default,live", help="allocator modes: default, live (see MODES)")
    parser.add_argument("--robust", default="median", choices=["median", "trimmed_mean", "krum", "none"],
                        help="also run _aggregate with this non-streaming aggregator at --robust-ks")
    parser.add_argument("--robust-ks", default="2,8", help="K values for --robust (it holds K x model in float64)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "agg-updates",
                        help="where the update files are written once and reused")
    parser.add_argument("--json", type=Path,
                        default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "aggregation_memory.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "aggregation_memory.png")
    parser.add_argument("--product-pythonpath", type=Path, default=None,
                        help="source tree (DIR/fedvlm/{coordinator,...}) to run the children against (A/B a patch)")
    parser.add_argument("--clean", action="store_true", help="delete the update files at the end")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--aggregator", default="mean", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.data, args.index, args.child, args.out, args.aggregator, args.phases.split(","))
        return

    ks = sorted(int(k) for k in args.ks.split(","))
    phases = [p for p in PHASES if p in args.phases.split(",")]
    modes = [m for m in MODES if m in args.modes.split(",")]
    robust_ks = [] if args.robust == "none" else sorted(int(k) for k in args.robust_ks.split(","))
    pythonpath = os.pathsep.join(filter(None, [str(args.product_pythonpath.resolve()) if args.product_pythonpath
                                               else None, str(REPO), os.environ.get("PYTHONPATH")]))
    started = time.perf_counter()
    entries = prepare_updates(args.data, max(ks + robust_ks) + 1, args.update_mb)
    index = args.data / f"index-{args.update_mb}MiB.json"
    print(f"{len(entries)} files of {entries[0]['bytes'] / MIB:.1f} MiB (1 base global + updates) in "
          f"{args.data / 'blobs'} ({time.perf_counter() - started:.0f} s to prepare)")
    per_k, robust = [], []
    for k in ks:
        row: dict = {"k": k}
        for mode in modes:
            row[mode] = {}
            for i, phase in enumerate(phases):
                warm(args.data, entries[:k + 1])
                extra = ["floor"] if i == 0 and mode == modes[0] else []
                row[mode].update(run_child(args.data, index, k, "mean", [phase] + extra, pythonpath, mode))
            row[mode].setdefault("floor_seconds", row[modes[0]]["floor_seconds"])
            print(f"K={k:3d} {mode:>7}: floor {row[mode]['floor_seconds']:.3f} s, "
                  + ", ".join(f"{PHASES[p]} {row[mode][f'{p}_seconds']:.2f} s" for p in phases))
        per_k.append(row)
    for k in robust_ks:
        warm(args.data, entries[:k + 1])
        r = run_child(args.data, index, k, args.robust, ["round"], pythonpath, "default")
        robust.append(r)
        print(f"K={k:3d} default: RoundDriver._aggregate with aggregator={args.robust} {r['round_seconds']:.2f} s")

    update_mib = per_k[0][modes[0]]["update_bytes"] / MIB
    print()
    print(f"{'':>3} {'':>9} {'':>7} | " + " | ".join(f"{PHASES[p][:31]:^31}" for p in phases) + " |")
    print(f"{'K':>3} {'files MiB':>9} {'malloc':>7} | "
          + " | ".join(f"{'anon':>7}{'file':>7}{'HWM':>7}{'s':>7}   " for _ in phases)
          + f" | {'floor s':>7} " + " ".join(f"{'x floor':>8}" for _ in phases))
    for row in per_k:
        for mode in modes:
            r = row[mode]
            cells = []
            for p in phases:
                m = above(r, p)
                cells.append(f"{m['anon']:>7.0f}{m['file']:>7.0f}{m['hwm']:>7.0f}{r[f'{p}_seconds']:>7.2f}   ")
            print(f"{row['k']:>3} {r['total_bytes'] / MIB:>9.0f} {mode:>7} | " + " | ".join(cells)
                  + f" | {r['floor_seconds']:>7.3f} "
                  + " ".join(f"{r[f'{p}_seconds'] / r['floor_seconds']:>8.1f}" for p in phases))
    print(f"(MiB above the fresh child just before the phase: peak RssAnon sampled every 2 ms, peak RssFile = mapped "
          f"file pages resident, VmHWM = kernel peak of RSS. One update = {update_mib:.0f} MiB; a child's RSS "
          f"after imports is {_mib(per_k[0][modes[0]]['start']['VmRSS']):.0f} MiB.)")
    for r in robust:
        m = above(r, "round")
        print(f"_aggregate with aggregator={r['aggregator']}, K={r['k']:>2}: anon {m['anon']:.0f} MiB, file "
              f"{m['file']:.0f} MiB, HWM {m['hwm']:.0f} MiB, {r['round_seconds']:.2f} s")
    slopes = {f"{mode}/{p}": slope(per_k, mode, p) for mode in modes for p in phases}
    if len(robust) >= 2:
        slopes[f"default/round aggregator={robust[0]['aggregator']}"] = (
            above(robust[-1], "round")["anon"] - above(robust[0], "round")["anon"]) / (robust[-1]["k"] - robust[0]["k"])
    streaming_slopes = {key: v for key, v in slopes.items() if "aggregator=" not in key}
    flat = all(v < 0.1 * update_mib for v in streaming_slopes.values())
    print("peak RssAnon growth per extra update (MiB; a non-streaming aggregator holds >= one update size, "
          f"{update_mib:.0f} MiB, per update): " + ", ".join(f"{key} {v:+.1f}" for key, v in slopes.items()))
    print(f"streaming FedAvg is {'FLAT in K' if flat else 'NOT flat in K'} "
          "(criterion: every mean-aggregator slope under 10% of one update)")

    results = {"benchmark": "aggregation_memory", "unit": "KiB for memory, seconds for time",
               "machine": machine_info(), "update_mib": args.update_mb, "update_bytes": int(update_mib * MIB),
               "tensors_per_update": TENSORS_PER_UPDATE, "ks": ks, "phases": phases, "modes": modes,
               "malloc_env": MODES, "per_k": per_k, "robust": robust, "slopes_mib_per_update": slopes,
               "flat_in_k": flat, "product_pythonpath": str(args.product_pythonpath or ""),
               "wall_seconds": time.perf_counter() - started}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    if args.clean:
        import shutil

        shutil.rmtree(args.data, ignore_errors=True)
    print(f"\nwrote {args.json} and {args.plot} ({results['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    sys.path.append(str(REPO))  # after PYTHONPATH, so --product-pythonpath trees win
    main()
