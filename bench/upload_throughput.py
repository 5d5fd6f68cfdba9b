"""Upload throughput: the product upload path against a raw mutual-TLS gRPC stream of the same bytes.

Product: a real `fedvlm-coord serve` daemon on 127.0.0.1 (tests/harness.py Coordinator) and one enrolled raw site
(RawSite). The site sends the run's initial adapter (ACTION_INIT, same tensor names and shapes as the update), then
one update per round (rounds = repeats) with the product client, `fedvlm.client.transfer.upload`, timed from
StartUpload to the accepted UploadResult: manifest signature check, 1 MiB frames appended to the part file with an
fsync + SQLite commit every CHECKPOINT_BYTES, SHA-256, schema and finiteness checks, adoption into the blob store.

Baseline: a minimal server in its own process, started here with the daemon's server key, certificate and CA (mutual
TLS, same server options, same thread pool), implementing only Federation/Upload: it counts the bytes of the same
UploadChunk frames (1 MiB, read from the same file through the same channel credentials) and discards them. Two
decomposition baselines reuse it: + append to a file, + fsync every CHECKPOINT_BYTES.

Each repeat runs raw and product back to back, in alternating order, then the decomposition baselines. Reported:
medians, the ratio product/raw of throughputs (target >= 0.9) and the ratio per repeat, CPU seconds of client and
server, and the server-side phases timed in-process on the same file (real Intake/adapters code, no network).

    python bench/upload_throughput.py [--size-mb 256] [--repeats 3] [--json PATH] [--plot PATH] [--workdir DIR]
                                      [--split-cores]

A/B of a patch (a scratch tree laid out as DIR/fedvlm/{coordinator,client,...}):
`--product-pythonpath DIR` runs the daemon and the in-process phases from DIR; `--compare-pythonpath DIR` adds a
second daemon from DIR that alternates with the first in the same run (`--compare-env KEY=VALUE` for it only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info  # bench/machine.py (scripts run from bench/)

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.9  # issue 12
MB = 1e6  # throughput unit: 10^6 bytes per second
RAW_MODES = ("raw", "raw+write", "raw+write+fsync")

CONFIG = """
name = "bench-upload"
[run]
rounds = {rounds}
min_clients = 1
clients_per_round = 1
quorum = 1
round_deadline = "3600s"
poll_interval = 0.1
heartbeat_timeout = "3600s"
max_update_mb = {max_mb}
final_eval = false
[task]
model = "tiny-llava"
"""


def _early_pythonpath() -> None:
    """Honour --product-pythonpath before anything imports fedvlm (the daemon inherits PYTHONPATH too)."""
    if "--product-pythonpath" in sys.argv:
        src = str(Path(sys.argv[sys.argv.index("--product-pythonpath") + 1]).resolve())
        sys.path.insert(0, src)
        os.environ["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
    sys.path.insert(1 if "--product-pythonpath" in sys.argv else 0, str(REPO))


# ---------------------------------------------------------------------------------------------------- raw server

def serve_raw(fed_dir: Path, checkpoint: int) -> None:
    """The baseline server: Federation/Upload over the coordinator's mTLS credentials; counts bytes, drops them."""
    from concurrent import futures

    import grpc

    from fedvlm.wire.credentials import SERVER_OPTIONS, mtls_server_credentials
    from fedvlm.wire.v1 import federation_pb2, federation_pb2_grpc

    sink_dir = fed_dir.parent / "rawsink"
    sink_dir.mkdir(parents=True, exist_ok=True)

    class Sink(federation_pb2_grpc.FederationServicer):
        """upload_id selects the mode: "raw" discards; "raw+write" appends to a file; "raw+write+fsync" also
        fsyncs every `checkpoint` bytes (the coordinator's CHECKPOINT_BYTES) and at the end, like the coordinator's
        checkpoints (without their SQLite commit)."""

        def Upload(self, request_iterator, context):  # noqa: N802 - gRPC method name
            received = pending = 0
            fh = None
            for frame in request_iterator:
                if fh is None and frame.upload_id.startswith("raw+write"):
                    fh = open(sink_dir / "sink.part", "wb")  # noqa: SIM115 - closed below
                if fh is not None:
                    fh.write(frame.data)
                    pending += len(frame.data)
                    if pending >= checkpoint and frame.upload_id == "raw+write+fsync":
                        fh.flush()
                        os.fsync(fh.fileno())
                        pending = 0
                received += len(frame.data)
            if fh is not None:
                if frame.upload_id == "raw+write+fsync":
                    fh.flush()
                    os.fsync(fh.fileno())
                fh.close()
                os.unlink(sink_dir / "sink.part")
            return federation_pb2.UploadResult(digest="", bytes_received=received)

    from fedvlm.coordinator.layout import FederationDir

    fed = FederationDir(fed_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=SERVER_OPTIONS)
    federation_pb2_grpc.add_FederationServicer_to_server(Sink(), server)
    creds = mtls_server_credentials(fed.server_key.read_bytes(), fed.server_cert.read_bytes(),
                                    fed.ca_cert.read_bytes())
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(f"PORT {port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(grace=1).wait()


# ---------------------------------------------------------------------------------------------------- payloads

def make_updates(folder: Path, count: int, size_mb: int, tensor_mb: int) -> tuple[list[Path], dict]:
    """`count` distinct safetensors files of `size_mb` MiB of float32, in tensors of `tensor_mb` MiB (same schema)."""
    import torch

    from fedvlm import adapters

    folder.mkdir(parents=True, exist_ok=True)
    n_tensors = max(1, size_mb // tensor_mb)
    cols = 4096
    rows = tensor_mb * (1 << 20) // 4 // cols
    gen = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.lora_B.weight": torch.randn(rows, cols, generator=gen) for i in range(n_tensors)}
    paths = []
    for k in range(count):
        path = folder / f"update_{k}.safetensors"
        if not path.exists():
            adapters.save_file_atomic({n: t + 0.001 * k for n, t in base.items()}, path)
        paths.append(path)
    shape = {"tensors": n_tensors, "tensor_shape": [rows, cols], "dtype": "float32",
             "file_bytes": paths[0].stat().st_size}
    return paths, shape


# ---------------------------------------------------------------------------------------------------- the two paths

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds consumed so far by process `pid` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_cpu(server_pid: int, fn) -> dict:
    """Run fn() and add the CPU seconds it cost this (client) process and the server process."""
    c0, s0 = time.process_time(), cpu_seconds(server_pid)
    result = fn()
    result["client_cpu_seconds"] = time.process_time() - c0
    result["server_cpu_seconds"] = cpu_seconds(server_pid) - s0
    return result


def product_upload(site, task, payload: Path, sha256: str) -> dict:
    """Sign a manifest for `payload` and send it with the product client; time StartUpload -> UploadResult."""
    from fedvlm.client import transfer
    from fedvlm.security import signing

    manifest = site.manifest(task, b"", sha256=sha256, size=payload.stat().st_size)
    pending = transfer.PendingUpload(manifest, signing.sign(site.identity.key, manifest.canonical()), payload)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if done == total:
            last[0] = time.perf_counter()  # gRPC pulled the last frame: from here on the server verifies

    t0 = time.perf_counter()
    outcome = transfer.upload(site.stub, pending, progress=progress)
    t1 = time.perf_counter()
    if outcome.digest != sha256:
        raise RuntimeError(f"coordinator accepted digest {outcome.digest}, expected {sha256}")
    return {"seconds": t1 - t0, "stream_seconds": last[0] - t0, "after_last_frame_seconds": t1 - last[0]}


def raw_upload(stub, payload: Path, mode: str = "raw") -> dict:
    """The same frames, from the same file, to the byte-counting server (`mode`: see serve_raw)."""
    from fedvlm.wire.chunks import iter_file_chunks
    from fedvlm.wire.v1 import federation_pb2 as pb

    size = payload.stat().st_size
    t0 = time.perf_counter()
    frames = (pb.UploadChunk(upload_id=mode, offset=off, data=data) for off, data in iter_file_chunks(payload))
    result = stub.Upload(frames, timeout=3600)
    t1 = time.perf_counter()
    if result.bytes_received != size:
        raise RuntimeError(f"raw server counted {result.bytes_received} of {size} bytes")
    return {"seconds": t1 - t0}


# ---------------------------------------------------------------------------------------------------- server phases

def server_phases(payload: Path, init_payload: Path, work: Path, repeats: int) -> dict:
    """Time the coordinator's server-side phases in-process on `payload` (the real Intake/adapters code)."""
    import hashlib
    import types

    import torch

    from fedvlm import adapters
    from fedvlm.coordinator.blobs import BlobStore, file_sha256
    from fedvlm.coordinator.intake import Intake
    from fedvlm.coordinator.state import State
    from fedvlm.security import pki, signing
    from fedvlm.security.signing import UpdateManifest
    from fedvlm.wire.chunks import iter_file_chunks

    work.mkdir(parents=True, exist_ok=True)
    state = State(work / "phases.db")
    intake = Intake(state, BlobStore(work / "blobs"), work / "uploads", "bench", 1 << 40, lambda: None)
    run = types.SimpleNamespace(schema_json=adapters.schema_to_json(adapters.read_file_schema(init_payload)))
    frames_in_memory = list(iter_file_chunks(payload))
    size = payload.stat().st_size
    key = pki.generate_key()
    ca_key, ca_cert = pki.create_ca("bench")
    cert = pki.issue_cert_for_key(ca_key, ca_cert, key.public_key(), "bench-site", "client", 3600)
    phases: dict[str, list[float]] = {k: [] for k in (
        "disk_floor_write_then_one_fsync", "signature_verify", "receive_write_fsync", "sha256_file",
        "schema_header", "finiteness", "proposed_finiteness_aminmax", "proposed_sha256_in_memory")}

    def timed(name: str, fn):
        t0 = time.perf_counter()
        out = fn()
        phases[name].append(time.perf_counter() - t0)
        return out

    def disk_floor(path=work / "floor.bin"):
        with open(path, "wb") as fh:
            for _, data in frames_in_memory:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()

    for rep in range(repeats):
        timed("disk_floor_write_then_one_fsync", disk_floor)
        manifest_bytes = b'{"bench":%d}' % rep
        sig = signing.sign(key, manifest_bytes)
        timed("signature_verify", lambda sig=sig, mb=manifest_bytes: signing.verify(cert, mb, sig))
        upload_id = f"bench{rep:04d}"
        manifest = UpdateManifest(federation_id="bench", run_id="r", round=1, client="c", base_digest="0" * 64,
                                  sha256="0" * 64, size=size, num_examples=1, nonce=signing.new_nonce(),
                                  created_at=time.time())
        upload = state.announce_upload(upload_id, manifest, manifest.to_json(), b"")
        frames = ((upload_id, off, data) for off, data in frames_in_memory)
        received = timed("receive_write_fsync", lambda upload=upload, frames=frames: intake._append(
            upload, next(frames), frames))
        received = received[0] if isinstance(received, tuple) else received
        assert received == size, received
        part = intake.part_path(upload_id)
        timed("sha256_file", lambda part=part: file_sha256(part))
        timed("schema_header", lambda part=part: adapters.check_schema(
            adapters.read_file_schema(part), adapters.schema_from_json(run.schema_json)))
        timed("finiteness", lambda part=part: [adapters.check_finite({n: t})
                                               for n, t in adapters.iter_file_tensors(part)])

        def aminmax_finite(part=part):
            for _, t in adapters.iter_file_tensors(part):
                lo, hi = torch.aminmax(t)
                if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                    raise ValueError("non-finite")

        timed("proposed_finiteness_aminmax", aminmax_finite)

        def hash_frames():
            h = hashlib.sha256()
            for _, data in frames_in_memory:
                h.update(data)
            return h.hexdigest()

        timed("proposed_sha256_in_memory", hash_frames)
        part.unlink()
        state.discard_upload(upload_id)
    state.close()
    return {name: statistics.median(v) for name, v in phases.items()}


# ---------------------------------------------------------------------------------------------------- report

def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = results["payload"]["file_bytes"]
    runs, summary, ph = results["runs"], results["summary"], results["server_phases_seconds"]
    ckpt = f"{results['checkpoint_bytes'] >> 20} MiB"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.1, 1.6]})
    bars = [("raw", "raw mTLS\ncount+discard", "#7f7f7f"), ("raw+write", "raw\n+ write", "#bcbd22"),
            ("raw+write+fsync", f"raw + write\n+ fsync/{ckpt}", "#9467bd"),
            ("product", "fedvlm\nupload", "#1f77b4")]
    if runs.get("product-b"):
        bars.append(("product-b", "fedvlm\n+ proposed fix", "#2ca02c"))
    for i, (key, _, color) in enumerate(bars):
        rates = [size / r["seconds"] / MB for r in runs[key]]
        ax1.bar(i, statistics.median(rates), color=color, alpha=0.8)
        ax1.scatter([i] * len(rates), rates, color="black", zorder=3, s=12)
        ratio = summary["raw_median_seconds"] / statistics.median(r["seconds"] for r in runs[key])
        ax1.text(i, statistics.median(rates), f"{ratio:.2f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(range(len(bars)), [b[1] for b in bars], fontsize=7.5)
    ax1.set_ylabel("MB/s (bar: median, dots: runs; label: ratio to raw)")
    ax1.set_title(f"{size / (1 << 20):.0f} MiB update in 1 MiB frames over mTLS gRPC on loopback: "
                  f"product/raw = {summary['ratio']:.2f} (target {TARGET_RATIO})", fontsize=8.5)

    rows = [
        ("raw stream", [("wire (count + discard)", summary["raw_median_seconds"], "#7f7f7f")]),
        ("fedvlm upload", [(f"stream: wire + write + fsync every {ckpt}", summary["product_stream_median_seconds"],
                            "#1f77b4"),
                           ("after the last frame: SHA-256 re-read, checks, accept",
                            summary["product_after_last_frame_median_seconds"], "#d62728")]),
    ]
    if "compare_median_seconds" in summary:
        rows.append(("fedvlm + proposed fix", [
            ("stream (fix)", summary["compare_stream_median_seconds"], "#2ca02c"),
            ("after the last frame (fix)", summary["compare_after_last_frame_median_seconds"], "#98df8a")]))
    rows += [
        ("server phases, in-process\n(same file, no network)", [
            (f"write + fsync every {ckpt} + SQLite commit", ph["receive_write_fsync"], "#9467bd"),
            ("SHA-256 re-read of the part file", ph["sha256_file"], "#ff7f0e"),
            ("finiteness: isfinite(t).all()", ph["finiteness"], "#8c564b"),
            ("schema + signature", ph["schema_header"] + ph["signature_verify"], "#17becf")]),
        ("proposed replacements", [
            ("SHA-256 while receiving (CPU, overlaps)", ph["proposed_sha256_in_memory"], "#ffbb78"),
            ("finiteness: aminmax", ph["proposed_finiteness_aminmax"], "#e377c2")]),
        ("disk floor", [("write 256 MiB + one fsync", ph["disk_floor_write_then_one_fsync"], "#c7c7c7")]),
    ]
    for y, (_, parts) in enumerate(rows):
        left = 0.0
        for name, secs, color in parts:
            ax2.barh(y, secs, left=left, color=color, label=name)
            left += secs
    ax2.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("seconds (medians of the same run)")
    ax2.set_title("where the upload's time goes", fontsize=9)
    ax2.legend(fontsize=6.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Daemon:
    """One `fedvlm-coord serve` (tests/harness.py Coordinator) with its enrolled raw site; optionally run from
    another source tree (PYTHONPATH) with extra environment variables."""

    def __init__(self, coordinator_cls, root: Path, sites: Path, config: str, pythonpath: Path | None,
                 env: dict[str, str]) -> None:
        self.coord = coordinator_cls(root, config)
        self.sites, self.pythonpath, self.env = sites, pythonpath, env
        self.site = None

    def start(self, site_cls) -> None:
        saved = dict(os.environ)
        try:
            if self.pythonpath:
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.pythonpath),
                                                                         os.environ.get("PYTHONPATH")]))
            os.environ.update(self.env)
            self.coord.start()  # the daemon inherits this environment
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.site = site_cls(self.coord, "site-a", self.sites)

    def stop(self) -> None:
        if self.site is not None:
            self.site.close()
        self.coord.kill()


def main() -> None:  # noqa: C901 - set-up, alternating runs, report
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=256, help="update size in MiB (float32)")
    parser.add_argument("--tensor-mb", type=int, default=32, help="size of each tensor in MiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--json", type=Path,
                        default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "upload_throughput.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "upload_throughput.png")
    parser.add_argument("--product-pythonpath", type=Path, default=None,
                        help="source tree to run the daemon and in-process phases from (A/B of a patch)")
    parser.add_argument("--compare-pythonpath", type=Path, default=None,
                        help="also run a second daemon from this tree, alternating with the first (same-run A/B)")
    parser.add_argument("--compare-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the comparison daemon only (repeatable)")
    parser.add_argument("--split-cores", action="store_true",
                        help="pin the servers (daemons, raw sink; every thread) to CPU 1 and this client to CPU 0")
    parser.add_argument("--raw-server", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sink-checkpoint", type=int, default=8 << 20, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        serve_raw(args.raw_server, args.sink_checkpoint)
        return

    import grpc

    import fedvlm.coordinator.intake as intake_module
    from fedvlm.coordinator.blobs import file_sha256
    from fedvlm.wire.v1 import federation_pb2 as pb
    from fedvlm.wire.v1 import federation_pb2_grpc
    from tests.harness import Coordinator, RawSite, wait_for

    work = Path(args.workdir or tempfile.mkdtemp(prefix="fedvlm-bench-upload-"))
    work.mkdir(parents=True, exist_ok=True)
    # A reused --workdir keeps only its payload files.
    for stale in ("coord", "coord-b", "sites", "sites-b", "phases", "rawsink"):
        shutil.rmtree(work / stale, ignore_errors=True)
    started = time.perf_counter()
    print(f"workdir {work}; product code from {Path(intake_module.__file__).resolve().parent.parent}")
    paths, payload = make_updates(work / "payloads", args.repeats + 1, args.size_mb, args.tensor_mb)
    digests = [file_sha256(p) for p in paths]
    init_path, update_paths = paths[0], paths[1:]
    size = payload["file_bytes"]
    print(f"payload: {payload['tensors']} x {payload['tensor_shape']} float32 = {size} bytes "
          f"({time.perf_counter() - started:.1f}s to prepare)")

    config = CONFIG.format(rounds=args.repeats, max_mb=max(1024, 2 * args.size_mb))
    daemons = {"product": Daemon(Coordinator, work / "coord", work / "sites", config, None, {})}
    if args.compare_pythonpath:
        env = dict(kv.split("=", 1) for kv in args.compare_env)
        daemons["product-b"] = Daemon(Coordinator, work / "coord-b", work / "sites-b", config,
                                      args.compare_pythonpath.resolve(), env)
    raw_proc = None
    runs: dict[str, list[dict]] = {key: [] for key in (*RAW_MODES, *daemons)}
    extra: dict[str, object] = {}
    try:
        for name, daemon in daemons.items():
            daemon.start(RawSite)
            first = wait_for(lambda d=daemon: (t := d.site.poll()).action == pb.ACTION_INIT and t, 60, "ACTION_INIT")
            extra[f"init_upload/{name}"] = with_cpu(daemon.coord.proc.pid, lambda d=daemon, f=first: product_upload(
                d.site, f, init_path, digests[0]))
            print(f"{name}: init upload (round 0, no schema check yet): "
                  f"{size / extra[f'init_upload/{name}']['seconds'] / MB:.0f} MB/s")
        main_daemon = daemons["product"]
        raw_proc = subprocess.Popen([sys.executable, __file__, "--raw-server", str(main_daemon.coord.fed.root),
                                     "--sink-checkpoint", str(intake_module.CHECKPOINT_BYTES)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = raw_proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"raw server failed to start: {line!r}")
        raw_channel = main_daemon.site.identity.channel(f"127.0.0.1:{line.split()[1]}")
        raw_stub = federation_pb2_grpc.FederationStub(raw_channel)
        grpc.channel_ready_future(raw_channel).result(timeout=30)
        raw_stub.Upload(iter([pb.UploadChunk(upload_id="warm", offset=0, data=b"x" * (1 << 20))]), timeout=30)
        if args.split_cores:  # `taskset -a`: every thread the process has now; threads started later inherit it
            for pid, cpu in [(os.getpid(), 0), (raw_proc.pid, 1), *((d.coord.proc.pid, 1) for d in daemons.values())]:
                subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True, capture_output=True)
            print("split cores: client on CPU 0, servers on CPU 1")

        for rep in range(args.repeats):
            # The headline group (raw and the daemon(s)) runs back to back in an order rotated every repeat; then
            # the two decomposition baselines (raw + page-cache write, raw + write + fsync every CHECKPOINT_BYTES).
            group = ["raw", *daemons]
            group = group[rep % len(group):] + group[:rep % len(group)]
            if rep % 2:
                group.reverse()
            decomposition = ("raw+write", "raw+write+fsync") if rep % 2 == 0 else ("raw+write+fsync", "raw+write")
            tasks = {name: wait_for(lambda d=d, rep=rep: (t := d.site.poll()).action == pb.ACTION_TRAIN
                                    and t.round == rep + 1 and t, 300, f"{name}: round {rep + 1} to open")
                     for name, d in daemons.items()}
            for kind in (*group, *decomposition):
                if kind in daemons:
                    d = daemons[kind]
                    result = with_cpu(d.coord.proc.pid, lambda d=d, rep=rep, task=tasks[kind]: product_upload(
                        d.site, task, update_paths[rep], digests[rep + 1]))
                    t_accept = time.perf_counter()  # the round closes now: wait for its aggregation to finish
                    wait_for(lambda d=d, rep=rep: d.coord.count("globals") >= rep + 2, 600, f"global {rep + 1}",
                             interval=0.05)
                    result["accept_to_global_seconds"] = time.perf_counter() - t_accept
                else:
                    result = with_cpu(raw_proc.pid, lambda rep=rep, kind=kind: raw_upload(
                        raw_stub, update_paths[rep], kind))
                runs[kind].append(result)
                print(f"repeat {rep + 1} {kind:>15}: {result['seconds']:6.2f} s "
                      f"{size / result['seconds'] / MB:7.1f} MB/s   cpu s: client {result['client_cpu_seconds']:.2f} "
                      f"server {result['server_cpu_seconds']:.2f}")
        raw_channel.close()
    finally:
        if raw_proc is not None:
            raw_proc.stdin.close()
            raw_proc.wait(timeout=30)
        for daemon in daemons.values():
            daemon.stop()

    print("timing server-side phases in-process on the same file ...")
    phases = server_phases(update_paths[0], init_path, work / "phases", args.repeats)

    def med(key: str, field: str = "seconds") -> float:
        return statistics.median(r[field] for r in runs[key])

    raw_s, prod_s = med("raw"), med("product")
    paired = [r["seconds"] / p["seconds"] for r, p in zip(runs["raw"], runs["product"], strict=True)]
    summary = {
        "raw_median_seconds": raw_s, "product_median_seconds": prod_s,
        "raw_median_mb_s": size / raw_s / MB, "product_median_mb_s": size / prod_s / MB,
        "ratio": raw_s / prod_s, "paired_ratios": paired, "paired_ratio_median": statistics.median(paired),
        "target_ratio": TARGET_RATIO, "meets_target": raw_s / prod_s >= TARGET_RATIO, "split_cores": args.split_cores,
        "raw_write_median_seconds": med("raw+write"), "raw_write_fsync_median_seconds": med("raw+write+fsync"),
        "product_stream_median_seconds": med("product", "stream_seconds"),
        "product_after_last_frame_median_seconds": med("product", "after_last_frame_seconds"),
        "accept_to_global_median_seconds": med("product", "accept_to_global_seconds"),
        **({"compare_median_seconds": med("product-b"), "compare_ratio": raw_s / med("product-b"),
            "compare_speedup_vs_product": prod_s / med("product-b"),
            "compare_paired_ratios": [r["seconds"] / p["seconds"] for r, p in zip(runs["raw"], runs["product-b"],
                                                                                 strict=True)],
            "compare_after_last_frame_median_seconds": med("product-b", "after_last_frame_seconds"),
            "compare_stream_median_seconds": med("product-b", "stream_seconds")} if "product-b" in runs else {}),
        "cpu_seconds_median": {key: {"client": med(key, "client_cpu_seconds"), "server": med(key, "server_cpu_seconds")}
                               for key in runs},
    }
    results = {"benchmark": "upload_throughput", "unit": "MB = 1e6 bytes", "machine": machine_info(),
               "payload": payload, "chunk_bytes": 1 << 20, "checkpoint_bytes": intake_module.CHECKPOINT_BYTES,
               "repeats": args.repeats, "runs": runs, "extra": extra, "server_phases_seconds": phases,
               "summary": summary, "product_source": str(Path(intake_module.__file__).resolve().parent.parent),
               "environment_overrides": {k: v for k, v in os.environ.items() if k.startswith("FEDVLM_")},
               "compare": {"pythonpath": str(args.compare_pythonpath or ""), "env": args.compare_env},
               "wall_seconds": None}

    labels = {"raw": "raw mTLS gRPC stream (count + discard)",
              "product": "fedvlm StartUpload -> accepted UploadResult",
              "raw+write": "  raw + write to page cache",
              "raw+write+fsync": f"  raw + write + fsync every {intake_module.CHECKPOINT_BYTES >> 20} MiB",
              "product-b": "comparison daemon (--compare-pythonpath)"}
    print()
    print(f"{'path (same bytes, same 1 MiB frames, mTLS)':<46}{'median s':>9}{'MB/s':>8}{'vs raw':>8}"
          f"{'cpu s cli/srv':>15}   runs MB/s")
    for key in ("raw", "product", *(["product-b"] if "product-b" in runs else []), "raw+write", "raw+write+fsync"):
        rates = " ".join(f"{size / r['seconds'] / MB:.0f}" for r in runs[key])
        cpu = summary["cpu_seconds_median"][key]
        print(f"{labels[key]:<46}{med(key):>9.2f}{size / med(key) / MB:>8.0f}{raw_s / med(key):>8.2f}"
              f"{cpu['client']:>8.2f}/{cpu['server']:<6.2f}   {rates}")
    verdict = "meets" if summary["meets_target"] else "BELOW"
    print(f"ratio product/raw (throughput, medians) = {summary['ratio']:.2f} ({verdict} target {TARGET_RATIO}); "
          f"paired per repeat: {' '.join(f'{x:.2f}' for x in paired)}")
    print(f"product: stream phase {summary['product_stream_median_seconds']:.2f} s, after last frame "
          f"{summary['product_after_last_frame_median_seconds']:.2f} s; accepted -> global published "
          f"{summary['accept_to_global_median_seconds']:.2f} s (the round's aggregation, not in the upload time)")
    if "product-b" in runs:
        print(f"comparison daemon: ratio {summary['compare_ratio']:.2f} (paired "
              f"{' '.join(f'{x:.2f}' for x in summary['compare_paired_ratios'])}), "
              f"{summary['compare_speedup_vs_product']:.2f}x faster than the product; stream "
              f"{summary['compare_stream_median_seconds']:.2f} s, after last frame "
              f"{summary['compare_after_last_frame_median_seconds']:.2f} s")
    print()
    print(f"{'server-side phase (in-process, same file, no network)':<56}{'median s':>9}{'MB/s':>8}")
    for name, secs in phases.items():
        rate = f"{size / secs / MB:>8.0f}" if secs > 1e-3 else f"{'-':>8}"
        print(f"{name:<56}{secs:>9.3f}{rate}")

    results["wall_seconds"] = time.perf_counter() - started
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    plot(results, args.plot)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {args.json} and {args.plot} ({results['wall_seconds']:.0f} s)"
          + (f"; scratch files kept in {work}" if args.workdir else ""))


if __name__ == "__main__":
    _early_pythonpath()
    main()
