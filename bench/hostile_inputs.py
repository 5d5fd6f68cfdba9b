"""Coordinator memory under hostile sites: what a site sending maximal headers or many streams costs the daemon.

A real `fedvlm-coord serve` daemon (tests/harness.py Coordinator, default `[limits]`) with one enrolled raw site that
has sent the initial adapter; round 1 is open. One after another (cheapest first, since the peak only grows):

- `streams`: the site opens 40 Upload streams and sends nothing (2 are held, `limits.streams_per_site`; 38 refused);
- `header-over-limit`: a signed 101 MiB update whose first 8 bytes announce a 101 MiB header (issue 13, row 12),
  refused on its first 1 MiB chunk (`limits.header_bytes`);
- `header-at-limit`: a header just under `limits.header_bytes` with `limits.tensors_per_update` entries, the largest
  header the coordinator parses; refused by the schema check after parsing.

Reported per attack: the daemon's RSS and peak RSS (VmHWM, /proc) before and after, and their growth, in MiB.

    python bench/hostile_inputs.py [--json PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import machine_info  # bench/machine.py (scripts run from bench/)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG = """
name = "bench-hostile"
[run]
rounds = 2
min_clients = 1
clients_per_round = 1
quorum = 1
round_deadline = "3600s"
poll_interval = 0.2
heartbeat_timeout = "3600s"
max_update_mb = 1024
final_eval = false
[task]
model = "tiny-llava"
"""
MIB = 1 << 20


def memory(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def header_at_limit(header_bytes: int, tensors: int) -> bytes:
    """Safetensors bytes whose header holds `tensors` zero-size entries with names padding it to `header_bytes`."""
    entry = '"{name}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    pad = (header_bytes - 2 - tensors * (len(entry.format(name="")) + 1)) // tensors - 8
    body = ",".join(entry.format(name=f"{i:08d}" + "x" * pad) for i in range(tensors))
    header = ("{" + body + "}").encode()
    assert len(header) <= header_bytes, len(header)
    return struct.pack("<Q", len(header)) + header


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "hostile.json")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import grpc
    import torch

    from fedvlm import adapters
    from fedvlm.coordinator.config import LimitsConfig
    from fedvlm.security import signing
    from fedvlm.wire.v1 import federation_pb2 as pb
    from tests.harness import Coordinator, RawSite, wait_for

    limits = LimitsConfig()
    root = Path(tempfile.mkdtemp(prefix="fedvlm-hostile-", dir=args.workdir))
    coord = Coordinator(root / "coord", CONFIG)
    coord.start()
    site = RawSite(coord, "a", root)
    task = site.poll()
    init = adapters.to_bytes({"layer.lora_A.weight": torch.zeros(8, 64), "layer.lora_B.weight": torch.zeros(64, 8)})
    site.send(site.manifest(task, init), init)
    task = wait_for(lambda: (t := site.poll()).action == pb.ACTION_TRAIN and t, 60, "round 1")
    pid = coord.proc.pid
    results = []

    def attack(name: str, run) -> None:
        before = memory(pid)
        outcome = run()
        time.sleep(1.0)  # let freed memory settle before reading RSS
        after = memory(pid)
        results.append({"attack": name, "outcome": outcome, "rss_before_mib": before["VmRSS"],
                        "rss_after_mib": after["VmRSS"], "rss_growth_mib": after["VmRSS"] - before["VmRSS"],
                        "peak_growth_mib": after["VmHWM"] - before["VmHWM"]})

    def streams() -> str:
        hold = threading.Event()

        def nothing():
            hold.wait(60)
            return
            yield

        calls = [site.stub.Upload.future(nothing(), timeout=60) for _ in range(40)]
        refused = wait_for(lambda: (done := [c for c in calls if c.done()]) and len(done) >= 38 and done, 30,
                           "38 refusals")
        codes = sorted({c.exception().code().name for c in refused})
        hold.set()
        for call in calls:
            call.cancel()
        return f"{len(refused)} of 40 refused ({', '.join(codes)})"

    def header_over_limit() -> str:
        size = 101 * MIB + 8
        first = struct.pack("<Q", 101 * MIB) + b"{" + b" " * (MIB - 9)
        manifest = site.manifest(task, b"", sha256="0" * 64, size=size)
        state = site.stub.StartUpload(pb.StartUploadRequest(
            manifest_json=manifest.to_json(), signature=signing.sign(site.identity.key, manifest.canonical())),
            timeout=30)
        try:
            site.stub.Upload(iter([pb.UploadChunk(upload_id=state.upload_id, offset=0, data=first)]), timeout=60)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return "accepted?"

    def header_at_the_limit() -> str:
        data = header_at_limit(limits.header_bytes, limits.tensors_per_update)
        try:
            site.send(site.manifest(task, data), data)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()[:90]}"
        return "accepted?"

    try:
        attack("streams", streams)
        attack("header-over-limit", header_over_limit)
        attack("header-at-limit", header_at_the_limit)
    finally:
        site.close()
        coord.kill()
    print(f"{'attack':<20} {'RSS before':>11} {'RSS after':>10} {'RSS +':>7} {'peak +':>7}  outcome")
    for r in results:
        print(f"{r['attack']:<20} {r['rss_before_mib']:>9.1f}Mi {r['rss_after_mib']:>8.1f}Mi "
              f"{r['rss_growth_mib']:>6.1f}M {r['peak_growth_mib']:>6.1f}M  {r['outcome']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "limits": dataclasses.asdict(limits),
                                     "results": results}, indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
