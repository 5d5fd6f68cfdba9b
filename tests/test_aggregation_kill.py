"""A coordinator SIGKILLed during aggregation restarts into the same global (issue 13, "beyond today").

The updates are large (128 MiB each), so aggregating them takes long enough for the kill, sent the moment the last
update is accepted, to land while the round's global is not yet published."""

from __future__ import annotations

import json

import pytest
import torch

from fedvlm import adapters
from fedvlm.client.transfer import Outbox, upload
from fedvlm.security import signing
from fedvlm.wire.v1 import federation_pb2 as pb

from .harness import Coordinator, RawSite, coord_cli, tensors_bytes, wait_for

pytestmark = pytest.mark.slow

CONFIG = """
name = "test-fed"
[run]
rounds = 1
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "600s"
poll_interval = 0.2
heartbeat_timeout = "600s"
max_update_mb = 200
final_eval = false
[task]
model = "tiny-llava"
"""
SHAPE = (2048, 8192)  # 64 MiB of float32 per tensor


def adapter(value: float) -> bytes:
    return tensors_bytes({"layer.lora_A.weight": torch.full(SHAPE, value),
                          "layer.lora_B.weight": torch.full(SHAPE[::-1], value)})


def send(site: RawSite, manifest, data: bytes) -> str:
    """Upload through the product client (1 MiB frames from the site's outbox); the accepted digest."""
    outbox = Outbox(site.state.outbox)
    return upload(site.stub, outbox.put(manifest, signing.sign(site.identity.key, manifest.canonical()), data)).digest


def test_a_coordinator_killed_during_aggregation_restarts_into_the_same_global(tmp_path):
    coord = Coordinator(tmp_path / "coord", CONFIG)
    coord.start()
    sites = {name: RawSite(coord, name, tmp_path) for name in ("a", "b")}
    try:
        init = sites["a"].poll()
        data = adapter(0.0)
        send(sites["a"], sites["a"].manifest(init, data), data)
        task = wait_for(lambda: (t := sites["b"].poll()).action == pb.ACTION_TRAIN and t, 60, "round 1")
        digests = {}
        for name, value, examples in (("a", 1.0, 10), ("b", 4.0, 30)):
            data = adapter(value)
            digests[name] = send(sites[name], sites[name].manifest(task, data, num_examples=examples), data)
        coord.kill()  # the last update was just accepted: its aggregation is running
        assert coord.count("globals") == 1, "the kill came after the global was published: nothing was tested"
        coord.start()
        wait_for(lambda: coord.count("globals") == 2, 120, "global 1 after the restart")
        row = coord.query("SELECT digest, record_json FROM globals WHERE round=1")[0]
        assert sorted(json.loads(row["record_json"])["contributors"]) == sorted(digests.values())
        merged = adapters.from_bytes((coord.fed.blobs / row["digest"][:2] / row["digest"]).read_bytes())
        for tensor in merged.values():  # (10 * 1 + 30 * 4) / 40
            assert tensor.min().item() == tensor.max().item() == pytest.approx(3.25)
        assert "audit log OK" in coord_cli("audit", "verify", "--dir", str(coord.fed.root))
    finally:
        for site in sites.values():
            site.close()
        coord.kill()
