"""What an operator does with `fedvlm-coord`, against a real daemon: health, reflection, remote status, revoke,
and the clear one-line errors of bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from fedvlm.coordinator.cli import app as coord_app
from fedvlm.coordinator.config import FederationConfig
from fedvlm.spec import SpecError
from fedvlm.wire.credentials import mtls_channel
from fedvlm.wire.v1 import admin_pb2, admin_pb2_grpc
from fedvlm.wire.v1 import federation_pb2 as pb

from .harness import Coordinator, RawSite, coord_cli, rpc_code, tensors_bytes, wait_for

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """
name = "ops"
[run]
rounds = 1
min_clients = 2
clients_per_round = 2
quorum = 2
poll_interval = 0.2
heartbeat_timeout = "60s"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    coord = Coordinator(root / "coord", CONFIG, ("--metrics-listen", f"127.0.0.1:{METRICS_PORT}"))
    coord.start()
    site = RawSite(coord, "alpha", root)
    site.poll(pb.CLIENT_STATE_IDLE)
    yield coord, site, root
    site.close()
    coord.kill()


def admin_channel(coord: Coordinator) -> grpc.Channel:
    pki = coord.fed.pki
    return mtls_channel(coord.address, (pki / "admin.key").read_bytes(), (pki / "admin.pem").read_bytes(),
                        (pki / "ca.pem").read_bytes())


def test_generated_stubs_match_the_proto_files():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_health_and_reflection_on_both_ports(ops):
    coord, _, _ = ops
    with admin_channel(coord) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedvlm.v1.Federation", "fedvlm.v1.Admin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in next(stream).list_services_response.service}
        assert {"fedvlm.v1.Federation", "fedvlm.v1.Admin", "grpc.health.v1.Health"} <= names
    with grpc.insecure_channel(coord.enroll_address) as channel:  # probes need no certificate here
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedvlm.v1.Enrollment"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.slow
def test_remote_status_needs_the_admin_certificate(ops):
    coord, site, _ = ops
    out = coord_cli("status", "--coordinator", coord.address, "--dir", str(coord.fed.root), "--json")
    assert '"live": true' in out and '"alpha"' in out
    table = coord_cli("status", "--coordinator", coord.address, "--dir", str(coord.fed.root))
    assert "alpha" in table and "waiting for the initial adapter, then 1 rounds" in " ".join(table.split())
    admin_as_site = admin_pb2_grpc.AdminStub(site.channel)
    assert rpc_code(lambda: admin_as_site.GetStatus(admin_pb2.StatusRequest(), timeout=5)) == \
        grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.slow
def test_remote_and_local_json_are_the_same_document(ops):
    coord, _, _ = ops
    def read(*where: str) -> dict:
        doc = json.loads(coord_cli("status", "--dir", str(coord.fed.root), *where, "--json"))
        doc.pop("now_unix")
        for client in doc["clients"]:
            client.pop("last_heartbeat_unix")  # alpha may poll between the two reads
        return doc

    remote = read("--coordinator", coord.address)
    assert remote.pop("live") is True
    # state.db holds the daemon's heartbeats once its next batch is written (every 0.25 s).
    def caught_up() -> dict | None:
        local = read()
        assert local.pop("live") is False
        return local if local == remote else None

    local = wait_for(caught_up, 10, "the local status to show what the daemon showed")
    assert set(local) == {f.name for f in admin_pb2.FederationStatus.DESCRIPTOR.fields} - {"live", "now_unix"}
    assert local["phase"] == "init" and isinstance(local["clients"][0]["bytes_total"], int)


@pytest.mark.slow
def test_prometheus_metrics_follow_the_conventions_with_counters_and_histograms(ops):
    from prometheus_client.parser import text_string_to_metric_families

    coord, site, _ = ops
    task = site.poll()
    data = tensors_bytes({"w": torch.zeros(2, 2)})
    if task.action == pb.ACTION_INIT:  # alpha builds run 1's initial adapter: one accepted update
        site.send(site.manifest(task, data), data)
    bad = site.manifest(task, data, round=5)
    assert rpc_code(lambda: site.send(bad, data)) == grpc.StatusCode.FAILED_PRECONDITION
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {name: f.type for name, f in families.items() if name.startswith("fedvlm_")}
    assert kinds == {
        "fedvlm_run_number": "gauge", "fedvlm_run_state": "gauge", "fedvlm_round": "gauge",
        "fedvlm_run_rounds": "gauge", "fedvlm_round_updates_accepted": "gauge", "fedvlm_round_sites_sampled": "gauge",
        "fedvlm_round_deadline_timestamp_seconds": "gauge", "fedvlm_client_state": "gauge",
        "fedvlm_client_last_heartbeat_timestamp_seconds": "gauge", "fedvlm_client_transfer_bytes": "gauge",
        "fedvlm_updates_accepted": "counter", "fedvlm_updates_refused": "counter",
        "fedvlm_update_received_bytes": "counter", "fedvlm_global_sent_bytes": "counter",
        "fedvlm_enrollments": "counter", "fedvlm_upload_duration_seconds": "histogram",
        "fedvlm_aggregation_duration_seconds": "histogram", "fedvlm_round_duration_seconds": "histogram",
    }
    for name, kind in kinds.items():  # `_total` only on counter samples; no gauge named like a counter
        samples = {s.name for s in families[name].samples}
        assert (kind == "counter") == all(n.endswith("_total") for n in samples), (name, samples)

    def value(family: str, sample: str, **labels) -> float:
        return next(s.value for s in families[family].samples if s.name == sample and s.labels == labels)

    assert value("fedvlm_updates_accepted", "fedvlm_updates_accepted_total") == 1
    assert value("fedvlm_updates_refused", "fedvlm_updates_refused_total", reason="failed_precondition") == 1
    assert value("fedvlm_update_received_bytes", "fedvlm_update_received_bytes_total") == len(data)
    assert value("fedvlm_enrollments", "fedvlm_enrollments_total", result="accepted") >= 1
    assert value("fedvlm_upload_duration_seconds", "fedvlm_upload_duration_seconds_count") == 1
    assert value("fedvlm_run_rounds", "fedvlm_run_rounds") == 1
    states = {s.labels["state"]: s.value for s in families["fedvlm_client_state"].samples
              if s.labels["client"] == "alpha"}
    assert sum(states.values()) == 1 and {"idle", "training", "offline", "failed"} <= set(states)
    assert "fedvlm_global_eval" not in families  # nothing scored yet; never num_examples as a metric label


@pytest.mark.slow
def test_revoked_site_is_refused_at_its_next_call(ops):
    coord, _, root = ops
    site = RawSite(coord, "beta", root)
    assert site.poll().action in (pb.ACTION_WAIT, pb.ACTION_INIT)
    assert "revoked beta" in coord_cli("revoke", "beta", "--dir", str(coord.fed.root))
    assert rpc_code(lambda: site.poll()) == grpc.StatusCode.PERMISSION_DENIED
    status = coord_cli("clients", "--dir", str(coord.fed.root), "--json")
    assert '"state": "revoked"' in status
    site.close()


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["enroll", "Bad Name!"], "invalid site name"),
    (["enroll", "admin"], "reserved"),
    (["enroll", "gamma", "--ttl", "soon"], "duration"),
    (["revoke", "nobody"], "no enrolled site"),
    (["export", "--round", "9", "--out", "{tmp}/x"], "no global version for round 9"),
])
def test_bad_operator_input_gets_a_one_line_error(ops, tmp_path, args, message):
    coord, _, _ = ops
    args = [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--dir", str(coord.fed.root)]
    result = CliRunner().invoke(coord_app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_init_refuses_to_overwrite_a_federation(ops):
    coord, _, _ = ops
    result = CliRunner().invoke(coord_app, ["init", "--dir", str(coord.fed.root)])
    assert result.exit_code == 1 and "refusing to overwrite" in result.output


@pytest.mark.parametrize(("toml", "key"), [
    ("[run]\nrounds = 0\n", "run.rounds"),
    ("[run]\nquorum = 5\nclients_per_round = 2\nmin_clients = 2\n", "run.quorum"),
    ("[run]\nround_deadline = \"soon\"\n", "run.round_deadline"),
    ("[run]\nroundz = 3\n", "run.roundz"),
    ("[task]\nstrategy = \"F-X\"\n", "task.strategy"),
    ("[task.train]\nlr = \"fast\"\n", "task.train.lr"),
])
def test_config_errors_name_the_bad_key(tmp_path, toml, key):
    path = tmp_path / "federation.toml"
    path.write_text(toml)
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        FederationConfig.load(path)


def test_init_prints_unwrapped_copyable_lines_and_keeps_secrets_private(tmp_path):
    import hashlib
    import os
    import stat

    from fedvlm.coordinator.state import State

    root = tmp_path / "a federation"  # a space: the printed commands quote it
    result = subprocess.run([sys.executable, "-c", "from fedvlm.coordinator.cli import main; main()", "init",
                             "--dir", str(root), "--host", "coord.example.org,10.0.0.5"],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "40", "EDITOR": "nano"},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    fingerprint = lines[lines.index("CA fingerprint (sha256):") + 1].strip()
    assert len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint)
    token = next(lines[i + 1].strip() for i, line in enumerate(lines) if line.startswith("dashboard token"))
    assert token.startswith("fvd1.") and len(token) > 40
    quoted = f"'{root}'"
    for command in (f"nano '{root}/federation.toml'", f"fedvlm-coord enroll SITE --dir {quoted}",
                    f"fedvlm-coord serve --dir {quoted}"):
        assert f"  {command}" in lines, (command, lines)  # whole, on one line, although the terminal is 40 wide
    mode = {p: stat.S_IMODE(p.stat().st_mode) for p in (root, root / "pki", root / "state.db",
                                                         root / "pki" / "ca.key", root / "pki" / "server.key",
                                                         root / "pki" / "admin.key")}
    assert mode[root] == mode[root / "pki"] == 0o700
    assert all(m == 0o600 for p, m in mode.items() if p.is_file()), mode
    state = State(root / "state.db", readonly=True)
    assert state.dashboard_token_sha256() == hashlib.sha256(token.encode()).hexdigest()
    state.close()
    rotated = CliRunner().invoke(coord_app, ["dashboard-token", "--dir", str(root)]).output.strip()
    state = State(root / "state.db", readonly=True)
    assert rotated != token and state.dashboard_token_sha256() == hashlib.sha256(rotated.encode()).hexdigest()
    assert [e.entry["kind"] for e in state.audit_entries()][-1] == "dashboard_token"
    state.close()
