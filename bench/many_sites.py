"""Many sites against one coordinator: enrollment, heartbeats during upload bursts, round completion, daemon cost.

A real `fedvlm-coord serve` daemon (tests/harness.py `Coordinator`) on 127.0.0.1 and N raw sites in this process,
each with its own key, join token, real enrollment (CSR over the enrollment port) and its own mutual-TLS channel;
after enrollment the sites are driven from `--procs` load-generator processes (the sites split evenly), so that
the measured latency is the coordinator's and not one Python process's, which drives hundreds of channels.
Every site sends a heartbeat (a quick Poll, wait_s 0, as the agent's heartbeat thread does) every second, each site
on its own phase of the second (`--burst`: each process sends its sites' at once), and never two at once: a site
whose previous heartbeat is unanswered skips that second (counted), as an agent's heartbeat thread waits for the
answer. The answer is also how it learns its assignment. Run config: every site sampled (`clients_per_round = quorum
= N`), `--rounds` rounds, no final evaluation. The first site to be told ACTION_INIT uploads the initial adapter (two
4x8 float32 tensors); in each round every site uploads one small signed update (StartUpload + Upload) as soon as its
heartbeat says TRAIN, from a pool of `--upload-threads` threads (split over the processes): the upload burst.

Baseline, in the same run and first (`--baseline-s`, default 10 s): the same sites and load generators against a
server with the daemon's mTLS credentials, gRPC options and thread count whose Poll returns a constant answer, i.e.
what a heartbeat costs on this machine before any of fedvlm's work.

Reported: token issue and enrollment rates (sites/s), heartbeat latency p50/p99/max over the whole run and during
the upload bursts only (round opened -> its last update accepted), heartbeats skipped, each round's completion time
(coordinator records: round opened -> global published), the daemon's CPU seconds and peak RSS (/proc), the load
generators' CPU seconds, and the same heartbeat figures for the baseline. Bounded: `--sites` (default 200;
`--sites 1000` for the issue's target), `--timeout` seconds in all.

    python bench/many_sites.py [--sites 200] [--rounds 2] [--threads 128] [--procs 4] [--baseline-s 10] [--burst]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from machine import machine_info  # bench/machine.py (scripts run from bench/)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/harness.py

CONFIG = """
name = "bench-many"
[run]
rounds = {rounds}
min_clients = {sites}
clients_per_round = {sites}
quorum = {sites}
round_deadline = "10m"
poll_interval = "1s"
heartbeat_timeout = "120s"
max_update_mb = 1
final_eval = false
[task]
model = "tiny-llava"
"""


class DaemonMeter:
    """CPU seconds and RSS of the daemon process, sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self.peak_rss_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.peak_rss_mib = max(self.peak_rss_mib, self.rss_mib())
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()


class Site:
    """One raw site: identity, channel, stub; the latest assignment its heartbeat got."""

    def __init__(self, index: int, name: str, identity, address: str) -> None:
        from fedvlm.wire.v1 import federation_pb2_grpc

        self.index, self.name, self.identity = index, name, identity
        self.channel = identity.channel(address)
        self.stub = federation_pb2_grpc.FederationStub(self.channel)
        self.latest = None
        self.uploaded: set[int] = set()
        self.in_flight = False  # an upload
        self.polling = False  # a heartbeat is unanswered: the next waits for it, as an agent's heartbeat thread does

    def update_bytes(self, round_: int) -> bytes:
        import torch

        from fedvlm import adapters

        value = round_ + (self.index + 1) / 4096  # distinct bytes per site and round (a global's contributors are)
        return adapters.to_bytes({"layer.lora_A.weight": torch.full((4, 8), value),
                                  "layer.lora_B.weight": torch.full((8, 4), value)})

    def upload(self, task) -> None:
        from fedvlm import adapters
        from fedvlm.security import signing
        from fedvlm.security.signing import UpdateManifest
        from fedvlm.wire.v1 import federation_pb2 as pb

        data = self.update_bytes(task.round)
        if task.round == 0:  # the initial adapter names the PEFT config the globals carry
            data = adapters.to_bytes(adapters.from_bytes(data),
                                     {adapters.ADAPTER_CONFIG_METADATA: json.dumps({"peft_type": "LORA"})})
        manifest = UpdateManifest(
            federation_id=self.identity.federation_id, run_id=task.run_id, round=task.round, client=self.name,
            base_digest=task.global_version.digest if task.round else signing.INITIAL_BASE,
            sha256=adapters.sha256_hex(data), size=len(data), num_examples=10, nonce=signing.new_nonce(),
            created_at=time.time())
        signature = signing.sign(self.identity.key, manifest.canonical())
        state = self.stub.StartUpload(pb.StartUploadRequest(manifest_json=manifest.to_json(), signature=signature),
                                      timeout=60)
        self.stub.Upload(iter([pb.UploadChunk(upload_id=state.upload_id, offset=state.offset,
                                              data=data[state.offset:])]), timeout=60)
        self.uploaded.add(task.round)


def drive_sites(names: list[tuple[int, str]], sites_dir: Path, address: str, upload_threads: int, spread: bool,
                stop, results) -> None:
    """One load-generator process: heartbeats every second for its sites and their uploads, until `stop` is set;
    then puts (latencies as (sent at, unix; seconds), errors) on `results`. `spread`: the sites' heartbeats are
    spread evenly over the second (else each second's are sent at once)."""
    from fedvlm.client.identity import StateDir
    from fedvlm.wire.v1 import federation_pb2 as pb

    sites = [Site(i, n, StateDir(sites_dir / n).load(), address) for i, n in names]
    # One process stands in for many sites' machines: a full collection here (up to 0.2 s as its heap grows) would
    # stall all its sites' heartbeats at once and be counted as the coordinator's latency. The process is bounded.
    gc.disable()
    latencies: list[tuple[float, float]] = []
    lock = threading.Lock()
    uploads = ThreadPoolExecutor(upload_threads)
    errors: list[str] = []
    ended = threading.Event()
    skipped = 0
    cpu = time.process_time()

    def send_upload(site: Site, task) -> None:
        try:
            site.upload(task)
        except Exception as exc:  # noqa: BLE001 - counted and shown; the run goes on
            errors.append(f"{site.name} round {task.round}: {exc}")
        finally:
            site.in_flight = False

    def on_answer(site: Site, sent_unix: float, sent: float, future) -> None:
        seconds = time.perf_counter() - sent
        site.polling = False
        if ended.is_set():  # calls still in flight when the run ended fail with the daemon: not counted
            return
        try:
            task = future.result()
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{site.name} heartbeat: {exc}")
            return
        with lock:
            latencies.append((sent_unix, seconds))
        site.latest = task
        if task.action in (pb.ACTION_INIT, pb.ACTION_TRAIN) and task.round not in site.uploaded \
                and not site.in_flight:
            site.in_flight = True
            uploads.submit(send_upload, site, task)

    while not stop.is_set():
        tick = time.perf_counter()
        for k, site in enumerate(sites):
            if spread:  # each site on its own phase of the second, as independent agents' timers are
                stop.wait(max(0.0, tick + k / len(sites) - time.perf_counter()))
            if site.polling:
                skipped += 1
                continue
            site.polling = True
            sent_unix, sent = time.time(), time.perf_counter()
            future = site.stub.Poll.future(pb.PollRequest(state=pb.CLIENT_STATE_IDLE), timeout=30)
            future.add_done_callback(lambda f, s=site, u=sent_unix, t=sent: on_answer(s, u, t, f))
        stop.wait(max(0.0, 1.0 - (time.perf_counter() - tick)))
    ended.set()
    uploads.shutdown(wait=True)
    with lock:
        results.put((latencies, errors, skipped, time.process_time() - cpu))
    for site in sites:
        site.channel.close()


@dataclass
class Load:
    """What the load generators saw: (sent at, unix; seconds) per answered heartbeat, errors, heartbeats not sent
    because the site's previous one was still unanswered, and their own CPU seconds."""

    latencies: list[tuple[float, float]]
    errors: list[str]
    skipped: int
    cpu_s: float


def drive(spawn, indexed: list[tuple[int, str]], work: Path, address: str, args, finished) -> Load:
    """Run the sites against `address` from --procs processes until `finished()`."""
    stop, results = spawn.Event(), spawn.Queue()
    per_proc_uploads = -(-args.upload_threads // args.procs)
    drivers = [spawn.Process(target=drive_sites, daemon=True,
                             args=(indexed[k::args.procs], work / "sites", address, per_proc_uploads, not args.burst,
                                   stop, results)) for k in range(args.procs)]
    latencies: list[tuple[float, float]] = []  # (sent at, unix; seconds)
    errors: list[str] = []
    try:
        for driver in drivers:
            driver.start()
        while not finished():
            time.sleep(0.5)
    finally:
        stop.set()
    skipped, cpu = 0, 0.0
    for _ in drivers:
        part, part_errors, part_skipped, part_cpu = results.get(timeout=120)
        latencies += part
        errors += part_errors
        skipped, cpu = skipped + part_skipped, cpu + part_cpu
    for driver in drivers:
        driver.join(timeout=10)
    return Load(latencies, errors, skipped, cpu)


def serve_echo(fed_root: str, threads: int, ports, stop) -> None:
    """The baseline server: the daemon's mTLS credentials, gRPC options and thread count, and a Poll that answers
    a constant WAIT at once (no state, no checks): what a heartbeat costs on this machine without fedvlm's work."""
    from concurrent import futures

    import grpc

    from fedvlm.coordinator.layout import FederationDir
    from fedvlm.wire.credentials import SERVER_OPTIONS, mtls_server_credentials
    from fedvlm.wire.v1 import federation_pb2, federation_pb2_grpc

    fed = FederationDir(Path(fed_root))
    answer = federation_pb2.Assignment(action=federation_pb2.ACTION_WAIT, message="round 1: not sampled",
                                       poll_interval_s=1.0)

    class Echo(federation_pb2_grpc.FederationServicer):
        def Poll(self, request, context):
            return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=SERVER_OPTIONS)
    federation_pb2_grpc.add_FederationServicer_to_server(Echo(), server)
    port = server.add_secure_port("127.0.0.1:0", mtls_server_credentials(
        fed.server_key.read_bytes(), fed.server_cert.read_bytes(), fed.ca_cert.read_bytes()))
    server.start()
    gc.freeze()  # as the daemon does once it serves
    ports.put(port)
    stop.wait()
    server.stop(0)


def echo_baseline(spawn, indexed: list[tuple[int, str]], work: Path, fed, args) -> dict:
    """The same sites and load generators against `serve_echo` for --baseline-s seconds (the daemon idle meanwhile:
    nobody polls it)."""
    stop, ports = spawn.Event(), spawn.Queue()
    server = spawn.Process(target=serve_echo, args=(str(fed.root), args.threads, ports, stop), daemon=True)
    server.start()
    try:
        address = f"127.0.0.1:{ports.get(timeout=60)}"
        meter = DaemonMeter(server.pid)
        end = time.monotonic() + args.baseline_s
        load = drive(spawn, indexed, work, address, args, lambda: time.monotonic() > end)
        cpu = meter.cpu_seconds()
        meter.stop()
    finally:
        stop.set()
        server.join(timeout=10)
    return {"seconds": args.baseline_s, **heartbeat_summary(load), "server_cpu_s": cpu}


def heartbeat_summary(load: Load) -> dict:
    seconds = [s for _, s in load.latencies]
    return {"heartbeats": len(seconds), "heartbeats_skipped": load.skipped, "errors": len(load.errors),
            "heartbeat_ms": {"p50": percentile(seconds, 0.5) * 1e3, "p99": percentile(seconds, 0.99) * 1e3,
                             "max": max(seconds, default=float("nan")) * 1e3},
            "load_generators_cpu_s": load.cpu_s}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=128, help="the daemon's `serve --threads`")
    parser.add_argument("--upload-threads", type=int, default=32, help="in all, split over --procs")
    parser.add_argument("--procs", type=int, default=4, help="load-generator processes the sites are spread over")
    parser.add_argument("--enroll-threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--burst", action="store_true",
                        help="send each process's heartbeats of a second at once (default: spread over the second)")
    parser.add_argument("--baseline-s", type=float, default=10.0,
                        help="seconds of the same heartbeats against a constant-answer mTLS server first (0: skip)")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "many_sites.json")
    args = parser.parse_args()
    if not 1 <= args.sites <= 2000:
        parser.error("--sites must be in 1..2000")
    if not 1 <= args.procs <= args.sites:
        parser.error("--procs must be in 1..--sites")
    from fedvlm.client.identity import StateDir
    from tests.harness import Coordinator, coord_cli

    deadline = time.monotonic() + args.timeout
    work = Path(tempfile.mkdtemp(prefix="fedvlm-many-"))
    coord = Coordinator(work / "coord", CONFIG.format(rounds=args.rounds, sites=args.sites),
                        ("--threads", str(args.threads)))
    coord.start()
    meter = DaemonMeter(coord.proc.pid)
    try:
        port = coord.enroll_address.rsplit(":", 1)[1]
        names = [f"site-{i:04d}" for i in range(args.sites)]
        started = time.perf_counter()
        tokens = {n: coord_cli("enroll", n, "--dir", str(coord.fed.root), "--ttl", "1h", "--enroll-port", port)
                  .strip().splitlines()[-1] for n in names}
        token_s = time.perf_counter() - started
        cpu_before = meter.cpu_seconds()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.enroll_threads) as pool:
            list(pool.map(lambda n: StateDir(work / "sites" / n).enroll(coord.address, tokens[n]), names))
        enroll_s = time.perf_counter() - started
        enroll_cpu = meter.cpu_seconds() - cpu_before
        print(f"{args.sites} sites: tokens {args.sites / token_s:.0f}/s, enrollment {args.sites / enroll_s:.0f}/s "
              f"(daemon CPU {enroll_cpu:.1f}s)", flush=True)

        spawn = multiprocessing.get_context("spawn")  # gRPC in the parent: no fork
        indexed = list(enumerate(names))
        baseline = None
        if args.baseline_s > 0:
            baseline = echo_baseline(spawn, indexed, work, coord.fed, args)
            echo = baseline["heartbeat_ms"]
            print(f"baseline (echo server, {args.baseline_s:.0f} s): heartbeat p50 {echo['p50']:.1f} ms, "
                  f"p99 {echo['p99']:.1f} ms", flush=True)
        cpu_before = meter.cpu_seconds()
        run_started = time.perf_counter()
        done = False

        def finished() -> bool:
            nonlocal done
            rows = coord.query("SELECT state FROM runs")
            done = bool(rows) and rows[0]["state"] == "done"
            return done or time.monotonic() > deadline

        load = drive(spawn, indexed, work, coord.address, args, finished)
        run_s = time.perf_counter() - run_started
        run_cpu = meter.cpu_seconds() - cpu_before
        rounds = json.loads(coord_cli("rounds", "--dir", str(coord.fed.root), "--json"))
        last_accepted = {r["round"]: r["last"] for r in coord.query(
            "SELECT round, MAX(accepted_at) AS last FROM updates GROUP BY round")}
    finally:
        meter.stop()
        peak = meter.peak_rss_mib
        coord.kill()
    burst_windows = [(r["started_unix"], last_accepted[r["round"]]) for r in rounds
                     if r["round"] >= 1 and r["round"] in last_accepted]  # round opened -> its last upload accepted
    in_burst = [s for t, s in load.latencies if any(a <= t <= b for a, b in burst_windows)]
    result = {
        "sites": args.sites, "procs": args.procs, "rounds": args.rounds, "daemon_threads": args.threads, "done": done,
        "heartbeats_spread": not args.burst, "baseline_echo": baseline,
        "tokens_per_s": args.sites / token_s, "enrollments_per_s": args.sites / enroll_s,
        **heartbeat_summary(load), "heartbeats_in_bursts": len(in_burst),
        "heartbeat_in_burst_ms": {"p50": percentile(in_burst, 0.5) * 1e3, "p99": percentile(in_burst, 0.99) * 1e3},
        "round_s": [r["finished_unix"] - r["started_unix"] for r in rounds if r["round"] >= 1],
        "upload_burst_s": [b - a for a, b in burst_windows],
        "run_s": run_s, "daemon_cpu_s": {"enrollment": enroll_cpu, "run": run_cpu}, "daemon_peak_rss_mib": peak,
        "first_errors": load.errors[:5],
    }
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), **result}, indent=2))
    print(f"JSON: {args.json}")
    if not done:
        raise SystemExit("the run did not finish within --timeout")


if __name__ == "__main__":
    main()
