"""Hostile inputs against a real served coordinator (real mTLS gRPC on loopback, real SQLite and blobs; issue 13).

Each test sends the real input as an adversarial site would, then asserts the status code, the message, that the
accepted state (rows and blob files) did not change, and that a legitimate site is served right after.
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import threading

import grpc
import pytest
import torch
from typer.testing import CliRunner

from fedvlm import adapters
from fedvlm.client.agent import Agent
from fedvlm.client.cli import app as client_app
from fedvlm.client.identity import StateDir
from fedvlm.client.transfer import Outbox, upload
from fedvlm.coordinator.cli import app as coord_app
from fedvlm.coordinator.config import RunConfig
from fedvlm.security import signing
from fedvlm.security.signing import UpdateManifest
from fedvlm.wire.v1 import federation_pb2 as pb
from fedvlm.wire.v1 import federation_pb2_grpc

from .harness import RawSite, coord_cli, tensors_bytes, wait_for
from .inprocess import InProcessCoordinator
from .inprocess import tensors as in_process_tensors
from .served import ServedCoordinator

CONFIG = """
name = "test-fed"
[run]
rounds = 2
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "60s"
max_update_mb = 4
final_eval = false
[limits]
header_bytes = 1048576
tensors_per_update = 64
manifest_bytes = 16384
metric_keys = 8
metric_key_bytes = 32
uploads_per_site = 2
streams_per_site = 2
stream_idle_timeout = "{idle}"
[task]
model = "tiny-llava"
"""

SHAPE = (64, 256)  # 64 KiB per tensor: a first chunk this large reaches the part file unbuffered


def adapter(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"layer.lora_A.weight": torch.full(SHAPE, value), "layer.lora_B.weight": torch.full(SHAPE[::-1], value)}


class Fed:
    """A served coordinator and sites a, b (enrolled and polling) and c (enrolled later: never sampled)."""

    def __init__(self, root, idle: str = "30s", until_round_one: bool = True) -> None:
        self.root = root
        self.coord = ServedCoordinator(root / "coord", CONFIG.format(idle=idle))
        self.coord.start()
        self.sites = {name: RawSite(self.coord, name, root) for name in ("a", "b")}
        self.init_task = self.sites["a"].poll()
        assert self.init_task.action == pb.ACTION_INIT, self.init_task
        if until_round_one:
            data = tensors_bytes(adapter())
            self.sites["a"].send(self.sites["a"].manifest(self.init_task, data), data)
            self.task = wait_for(lambda: (t := self.sites["b"].poll()).action == pb.ACTION_TRAIN and t, 30,
                                 "round 1 to open")
        self.sites["c"] = RawSite(self.coord, "c", root)

    def snapshot(self) -> dict:
        """The accepted state: rows of every table that holds accepted things, and the blob files."""
        c = self.coord
        tables = ("updates", "nonces", "globals", "audit", "tokens", "clients", "metrics")
        blobs = sorted(p.name for p in c.fed.blobs.rglob("*") if p.is_file())
        return {**{t: c.count(t) for t in tables}, "blobs": blobs}

    def no_partial_upload(self) -> bool:
        return self.coord.count("uploads") == 0 and not any(self.coord.fed.uploads.iterdir())

    def legitimate_site_is_served(self, name: str = "b") -> None:
        """Site `name` polls, is asked to train round 1 and its update is accepted."""
        site = self.sites[name]
        task = site.poll()
        assert task.action == pb.ACTION_TRAIN and task.round == 1, task
        data = tensors_bytes(adapter(1.0))
        assert site.send(site.manifest(task, data), data).digest == adapters.sha256_hex(data)

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.coord.kill()


@pytest.fixture
def fed(tmp_path):
    f = Fed(tmp_path)
    yield f
    f.close()


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def signed(site: RawSite, fields: dict) -> pb.StartUploadRequest:
    """A StartUploadRequest for manifest `fields` as given (no local validation), signed by the site's key."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return pb.StartUploadRequest(manifest_json=text, signature=signing.sign(site.identity.key,
                                                                           UpdateManifest.DOMAIN + text.encode()))


def announce(site: RawSite, task, data: bytes) -> pb.UploadState:
    manifest = site.manifest(task, data)
    return site.stub.StartUpload(pb.StartUploadRequest(
        manifest_json=manifest.to_json(), signature=signing.sign(site.identity.key, manifest.canonical())), timeout=10)


def stream(site: RawSite, state: pb.UploadState, data: bytes, offset: int = 0):
    return site.stub.Upload(iter([pb.UploadChunk(upload_id=state.upload_id, offset=offset, data=data)]), timeout=30)


def nested_header(depth: int) -> bytes:
    header = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    return struct.pack("<Q", len(header)) + header


# -- 1: nesting -----------------------------------------------------------------------------------------------------
def test_a_safetensors_header_nested_50000_deep_is_refused_and_nothing_is_left(fed):
    before = fed.snapshot()
    site, data = fed.sites["a"], nested_header(50_000)
    error = refusal(lambda: site.send(site.manifest(fed.task, data), data))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "safetensors header is nested too deeply" in error.details()
    assert fed.snapshot() == before and fed.no_partial_upload()
    fed.legitimate_site_is_served()


@pytest.mark.parametrize(("depth", "code", "message"), [
    (8_000, grpc.StatusCode.INVALID_ARGUMENT, "UpdateManifest JSON is nested too deeply"),
    (50_000, grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds limits.manifest_bytes (16384)"),
])
def test_a_nested_manifest_is_refused_and_nothing_is_left(fed, depth, code, message):
    before = fed.snapshot()
    site = fed.sites["a"]
    text = "[" * depth + "]" * depth
    request = pb.StartUploadRequest(manifest_json=text, signature=signing.sign(site.identity.key, text.encode()))
    error = refusal(lambda: site.stub.StartUpload(request, timeout=10))
    assert error.code() == code and message in error.details()
    assert fed.snapshot() == before and fed.no_partial_upload()
    fed.legitimate_site_is_served()


# -- 2: integers past SQLite's INTEGER ------------------------------------------------------------------------------
def test_num_examples_of_2_to_the_63_is_refused_at_start_upload(fed):
    before = fed.snapshot()
    site, data = fed.sites["a"], tensors_bytes(adapter(1.0))
    fields = json.loads(site.manifest(fed.task, data).to_json())
    fields["num_examples"] = 2**63
    error = refusal(lambda: site.stub.StartUpload(signed(site, fields), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UpdateManifest.num_examples must be between 0 and 9223372036854775807" in error.details()
    assert fed.snapshot() == before and fed.no_partial_upload()
    fed.legitimate_site_is_served()


# -- 3, 10: metrics -------------------------------------------------------------------------------------------------
def metrics_report(fed, metrics, round_=0, kind="eval") -> pb.MetricsReport:
    return pb.MetricsReport(run_id=fed.task.run_id, round=round_, kind=kind, metrics=metrics,
                            global_digest=fed.task.global_version.digest)


@pytest.mark.parametrize(("metrics", "round_", "code", "message"), [
    ({"loss": math.nan}, 0, grpc.StatusCode.INVALID_ARGUMENT, "metric 'loss' is nan: only finite values"),
    ({"accuracy": math.inf}, 0, grpc.StatusCode.INVALID_ARGUMENT, "metric 'accuracy' is inf: only finite values"),
    ({f"k{i}": 1.0 for i in range(9)}, 0, grpc.StatusCode.RESOURCE_EXHAUSTED, "9 metric keys exceed "
     "limits.metric_keys (8)"),
    ({"k" * 33: 1.0}, 0, grpc.StatusCode.RESOURCE_EXHAUSTED, "a metric key of 33 bytes exceeds "
     "limits.metric_key_bytes (32)"),
    ({"accuracy": 0.5}, 57, grpc.StatusCode.INVALID_ARGUMENT, "metrics for round 57, but the run is at round 1"),
    ({"accuracy": 0.5}, -1, grpc.StatusCode.INVALID_ARGUMENT, "metrics for round -1, but the run is at round 1"),
])
def test_metrics_out_of_bounds_are_refused(fed, metrics, round_, code, message):
    before = fed.snapshot()
    error = refusal(lambda: fed.sites["c"].stub.ReportMetrics(metrics_report(fed, metrics, round_), timeout=10))
    assert error.code() == code and message in error.details()
    assert fed.snapshot() == before
    fed.sites["b"].stub.ReportMetrics(metrics_report(fed, {"accuracy": 0.5}), timeout=10)  # served right after
    rounds = json.loads(coord_cli("rounds", "--dir", str(fed.coord.fed.root), "--json"), parse_constant=_strict)
    assert rounds[0]["eval_metrics"]["accuracy"] == 0.5
    fed.legitimate_site_is_served()


def _strict(token: str):
    raise AssertionError(f"--json printed {token}, which is not JSON")


def test_rounds_json_is_valid_json_when_state_holds_a_non_finite_metric(fed):
    fed.sites["b"].stub.ReportMetrics(metrics_report(fed, {"accuracy": 0.5}), timeout=10)
    db = sqlite3.connect(fed.coord.fed.database)  # as an older fedvlm stored it: json.dumps writes NaN
    db.execute("UPDATE metrics SET metrics_json=? WHERE client='b'", (json.dumps({"accuracy": math.nan}),))
    db.commit()
    db.close()
    root = str(fed.coord.fed.root)
    for remote in ((), ("--coordinator", fed.coord.address)):
        rounds = json.loads(coord_cli("rounds", "--dir", root, "--json", *remote), parse_constant=_strict)
        assert rounds[0]["eval_metrics"]["accuracy"] is None
    fed.legitimate_site_is_served()


# -- 4: site-chosen strings -----------------------------------------------------------------------------------------
def test_a_metric_key_that_looks_like_markup_is_shown_literally_by_status(fed):
    fed.sites["b"].stub.ReportMetrics(metrics_report(fed, {"[/status]": 1.0, "[bold red]x": 2.0}), timeout=10)
    root = str(fed.coord.fed.root)
    for args in (("status", "--dir", root), ("status", "--coordinator", fed.coord.address, "--dir", root)):
        result = CliRunner().invoke(coord_app, list(args), env={"COLUMNS": "400"})
        assert result.exit_code == 0, result.output
        assert "[/status]=1" in result.output and "[bold red]x=2" in result.output
    fed.legitimate_site_is_served()


# -- 5: revoked while the stream is open ----------------------------------------------------------------------------
def test_a_site_revoked_while_its_upload_stream_is_open_is_refused_at_finalize(fed):
    site, data = fed.sites["a"], tensors_bytes(adapter(2.0))
    state = announce(site, fed.task, data)
    before = fed.snapshot()
    release = threading.Event()
    half = len(data) // 2

    def frames():
        yield pb.UploadChunk(upload_id=state.upload_id, offset=0, data=data[:half])
        release.wait(30)
        yield pb.UploadChunk(upload_id=state.upload_id, offset=half, data=data[half:])

    call = site.stub.Upload.future(frames(), timeout=60)
    part = fed.coord.daemon.intake.part_path(state.upload_id)
    wait_for(lambda: part.exists() and part.stat().st_size > 0, 30, "the first chunk to reach the part file")
    coord_cli("revoke", "a", "--dir", str(fed.coord.fed.root))
    release.set()
    error = refusal(call.result)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "client 'a' has been revoked" in error.details()
    after = fed.snapshot()
    assert {**after, "audit": before["audit"]} == before and after["audit"] == before["audit"] + 1  # the revoke
    assert fed.no_partial_upload()
    fed.legitimate_site_is_served()


# -- 6: site names --------------------------------------------------------------------------------------------------
def test_enrolling_a_name_with_a_trailing_newline_is_refused(fed):
    before = fed.snapshot()
    result = CliRunner().invoke(coord_app, ["enroll", "site-z\n", "--dir", str(fed.coord.fed.root)])
    assert result.exit_code != 0
    assert "invalid site name 'site-z\\n'" in result.output and len(result.output.strip().splitlines()) == 1
    assert fed.snapshot() == before
    RawSite(fed.coord, "site-z", fed.root).close()  # the name itself enrolls
    fed.legitimate_site_is_served()


# -- 7: two streams, one upload -------------------------------------------------------------------------------------
def test_two_concurrent_streams_on_one_upload_one_wins_the_other_gets_a_clear_status(fed):
    site, data = fed.sites["a"], tensors_bytes(adapter(3.0))
    state = announce(site, fed.task, data)
    release = threading.Event()
    half = len(data) // 2

    def frames():
        yield pb.UploadChunk(upload_id=state.upload_id, offset=0, data=data[:half])
        release.wait(30)
        yield pb.UploadChunk(upload_id=state.upload_id, offset=half, data=data[half:])

    first = site.stub.Upload.future(frames(), timeout=60)
    part = fed.coord.daemon.intake.part_path(state.upload_id)
    wait_for(lambda: part.exists() and part.stat().st_size > 0, 30, "the first stream to be writing")
    error = refusal(lambda: stream(site, state, data))
    assert error.code() == grpc.StatusCode.ABORTED and "another stream is sending this upload" in error.details()
    # The site agent, resuming the same signed update meanwhile, keeps it to retry (it does not retrain).
    manifest = UpdateManifest.from_json(fed.coord.query("SELECT manifest_json FROM uploads")[0]["manifest_json"])
    outbox = Outbox(site.state.outbox)
    pending = outbox.put(manifest, signing.sign(site.identity.key, manifest.canonical()), data)
    agent = Agent(fed.coord.address, site.identity, site.state, fed.root)
    assert refusal(lambda: agent._upload(site.stub, pending)).code() == grpc.StatusCode.ABORTED
    assert outbox.get(manifest.run_id, manifest.round) == pending
    release.set()
    assert first.result().digest == adapters.sha256_hex(data)  # the first one wins
    error = refusal(lambda: stream(site, state, data))  # a late third stream: the id is gone with its upload
    assert error.code() == grpc.StatusCode.NOT_FOUND and "unknown upload id" in error.details()
    assert [r["client"] for r in fed.coord.query("SELECT client FROM updates WHERE round=1")] == ["a"]
    fed.legitimate_site_is_served()


# -- 8: the initial adapter -----------------------------------------------------------------------------------------
def test_an_initial_adapter_with_no_tensor_is_refused(tmp_path):
    fed = Fed(tmp_path, until_round_one=False)
    try:
        before = fed.snapshot()
        site, empty = fed.sites["a"], adapters.to_bytes({})
        error = refusal(lambda: site.send(site.manifest(fed.init_task, empty), empty))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the initial adapter holds no tensor" in error.details()
        assert fed.snapshot() == before and fed.no_partial_upload()
        data = tensors_bytes(adapter())
        site.send(site.manifest(fed.init_task, data), data)  # the same site, served right after
        wait_for(lambda: fed.coord.count("globals") == 1, 30, "global 0")
    finally:
        fed.close()


# -- 9: unfinished uploads ------------------------------------------------------------------------------------------
def test_unfinished_uploads_are_capped_per_site_and_those_of_a_closed_round_are_reclaimed(fed):
    site = fed.sites["a"]
    updates = [tensors_bytes(adapter(10.0 + i)) for i in range(3)]
    states = [announce(site, fed.task, data) for data in updates[:2]]
    for state, data in zip(states, updates, strict=False):
        stream(site, state, data[: len(data) // 4])  # a quarter of each
    before = fed.snapshot()
    error = refusal(lambda: announce(site, fed.task, updates[2]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'a' already holds 2 unfinished uploads (limits.uploads_per_site = 2)" in error.details()
    assert fed.snapshot() == before and fed.coord.count("uploads") == 2
    quarter = len(updates[0]) // 4
    assert stream(site, states[0], updates[0][quarter:], quarter).digest  # a resumes one of them: accepted
    fed.legitimate_site_is_served()  # b's update closes round 1
    wait_for(lambda: fed.coord.count("globals") == 2, 30, "global 1")
    wait_for(fed.no_partial_upload, 30, "the closed round's unfinished upload to be reclaimed")


# -- 11: streams held open ------------------------------------------------------------------------------------------
def test_a_site_holding_40_idle_upload_streams_does_not_starve_other_sites(fed):
    hold = threading.Event()

    def nothing():
        hold.wait(60)
        return
        yield

    calls = [fed.sites["c"].stub.Upload.future(nothing(), timeout=60) for _ in range(40)]
    try:
        refused = wait_for(lambda: (done := [c for c in calls if c.done()]) and len(done) >= 38 and done, 30,
                           "the streams past the cap to be refused")
        assert len(refused) == 38  # the cap's two stay open
        for call in refused:
            error = call.exception()
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "'c' already has 2 Upload streams open (limits.streams_per_site = 2)" in error.details()
        fed.legitimate_site_is_served()  # while c holds its two streams
        assert fed.sites["a"].poll().action == pb.ACTION_TRAIN
    finally:
        hold.set()


def test_an_idle_upload_stream_times_out(tmp_path):
    fed = Fed(tmp_path, idle="1s")
    try:
        site, data = fed.sites["a"], tensors_bytes(adapter(4.0))
        state = announce(site, fed.task, data)
        release = threading.Event()

        def stalls():
            yield pb.UploadChunk(upload_id=state.upload_id, offset=0, data=data[:1000])
            release.wait(60)

        before = fed.snapshot()
        try:
            error = refusal(lambda: site.stub.Upload(stalls(), timeout=60))
        finally:
            release.set()
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no upload data for 1s (limits.stream_idle_timeout)" in error.details()
        assert fed.snapshot() == before
        assert fed.coord.query("SELECT received FROM uploads")[0]["received"] == 1000  # the durable prefix
        assert stream(site, state, data[1000:], 1000).digest  # and it resumes from there
        fed.legitimate_site_is_served()
    finally:
        fed.close()


# -- 12: header and tensor limits -----------------------------------------------------------------------------------
def test_a_header_over_the_limit_is_refused_at_its_first_chunk_and_nothing_is_left(fed):
    site = fed.sites["a"]
    data = struct.pack("<Q", 2 << 20) + b"{" + b" " * ((3 << 20) - 9)  # announces a 2 MiB header in 3 MiB
    before = fed.snapshot()
    state = announce(site, fed.task, data)
    error = refusal(lambda: stream(site, state, data[: 64 << 10]))  # the first chunk only
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "safetensors header of 2097152 bytes exceeds the limit of 1048576 bytes (limits.header_bytes)" in \
        error.details()
    assert fed.snapshot() == before and fed.no_partial_upload()
    fed.legitimate_site_is_served()


def test_an_update_with_more_tensors_than_the_limit_is_refused(fed):
    site = fed.sites["a"]
    data = tensors_bytes({f"t{i}": torch.zeros(0) for i in range(65)})
    before = fed.snapshot()
    error = refusal(lambda: site.send(site.manifest(fed.task, data), data))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than the limit of 64 tensors (limits.tensors_per_update)" in error.details()
    assert fed.snapshot() == before and fed.no_partial_upload()
    fed.legitimate_site_is_served()


# -- 13: every byte durable, not accepted ---------------------------------------------------------------------------
def test_a_resumed_upload_whose_bytes_are_all_durable_is_accepted_without_retraining(fed, monkeypatch):
    site, data = fed.sites["a"], tensors_bytes(adapter(5.0))
    outbox = Outbox(site.state.outbox)
    manifest = site.manifest(fed.task, data)
    pending = outbox.put(manifest, signing.sign(site.identity.key, manifest.canonical()), data)

    def dies(*_):  # the coordinator stops after the last checkpoint, before acceptance
        raise SystemError("killed")

    monkeypatch.setattr(fed.coord.daemon.intake, "_finalize", dies)
    assert refusal(lambda: upload(site.stub, pending)).code() == grpc.StatusCode.UNKNOWN
    assert fed.coord.query("SELECT received, size FROM uploads") == [{"received": len(data), "size": len(data)}]
    fed.coord.kill()
    fed.coord.start()  # restarted: nothing of the first process is left but its files
    before = fed.snapshot()
    agent = Agent(fed.coord.address, site.identity, site.state, fed.root)
    with site.identity.channel(fed.coord.address) as channel:
        agent._upload(federation_pb2_grpc.FederationStub(channel), pending)  # the agent's resume: no new manifest
    assert outbox.get(manifest.run_id, manifest.round) is None
    assert fed.coord.query("SELECT client, digest FROM updates WHERE round=1") == [
        {"client": "a", "digest": manifest.sha256}]
    assert fed.snapshot()["blobs"] == sorted([*before["blobs"], manifest.sha256])
    assert fed.no_partial_upload()
    # Its answer lost again, the agent resends: ALREADY_EXISTS means this very update is in, so the algorithm state
    # of the round is kept (the round counted) and the outbox emptied.
    pending = outbox.put(manifest, pending.signature, data)
    agent._save_algorithm_state(manifest.run_id, manifest.round, {"c": torch.zeros(1)})
    with site.identity.channel(fed.coord.address) as channel:
        agent._upload(federation_pb2_grpc.FederationStub(channel), pending)
    assert outbox.get(manifest.run_id, manifest.round) is None
    assert agent._algorithm_state_files(manifest.run_id) != []
    fed.legitimate_site_is_served()


def test_unfinished_uploads_past_their_retention_are_reclaimed_and_those_of_the_open_round_kept(tmp_path):
    from fedvlm.coordinator.config import LimitsConfig

    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=2, min_clients=3, clients_per_round=3, quorum=3))
    coord.intake.limits = LimitsConfig(partial_upload_retention=60)
    coord.open_round_one()
    data = adapters.to_bytes(in_process_tensors(1.0))
    ticket = coord.start("a", coord.manifest("a", data))
    coord.intake.receive("a", iter([(ticket.upload_id, 0, data[:100])]))
    assert coord.intake.reclaim() == 0  # the open round's, within its retention: kept
    coord.clock.advance(61)
    assert coord.intake.reclaim() == 1
    assert coord.state.upload(ticket.upload_id) is None and not coord.intake.part_path(ticket.upload_id).exists()


# -- 14: a site's own data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "message"), [
    ("escape", "train.json: record 0 (id 'r0'): field 'image': path '../../etc/passwd' escapes the data folder"),
    ("broken", "train.json: record 1 (id 'r1'): field 'image': 'images/bad.png' is not a readable image"),
])
def test_a_bad_data_folder_is_refused_in_one_line_before_enrolling(fed, case, message):
    from PIL import Image

    data = fed.root / f"data-{case}"
    (data / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(data / "images" / "ok.png")
    (data / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image")
    convo = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A digit."}]
    image = "../../etc/passwd" if case == "escape" else "images/ok.png"
    records = [{"id": "r0", "image": image, "conversations": convo},
               {"id": "r1", "image": "images/bad.png" if case == "broken" else "images/ok.png", "conversations": convo}]
    (data / "train.json").write_text(json.dumps(records))
    token = fed.coord.token("d")
    before = fed.snapshot()
    args = ["--coordinator", fed.coord.address, "--join-token", token, "--data", str(data),
            "--state", str(fed.root / f"state-{case}"), "--device", "cpu"]
    result = CliRunner().invoke(client_app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert fed.snapshot() == before
    assert fed.coord.query("SELECT used_at FROM tokens WHERE name='d'") == [{"used_at": None}]  # not enrolled
    StateDir(fed.root / f"state-{case}-fixed").enroll(fed.coord.address, token)  # the token still works
    fed.legitimate_site_is_served()


def test_limits_are_read_from_federation_toml_and_a_bad_one_names_its_key(tmp_path):
    from fedvlm.coordinator.config import FederationConfig
    from fedvlm.spec import SpecError

    path = tmp_path / "federation.toml"
    path.write_text('[limits]\nstreams_per_site = 0\n')
    with pytest.raises(SpecError, match=r"limits.streams_per_site: must be >= 1"):
        FederationConfig.load(path)
    path.write_text('[limits]\nstream_idle_timeout = "2m"\nheader_bytes = 1024\n')
    limits = FederationConfig.load(path).limits
    assert (limits.stream_idle_timeout, limits.header_bytes, limits.uploads_per_site) == (120.0, 1024, 2)


def test_every_limit_is_in_the_operations_table_and_the_default_federation_toml():
    import dataclasses
    import tomllib
    from pathlib import Path

    from fedvlm.coordinator.config import DEFAULT_TOML, FederationConfig, LimitsConfig

    table = Path(__file__).parent.parent.joinpath("docs", "operations.md").read_text().split("## Limits", 1)[1]
    defaults = tomllib.loads(DEFAULT_TOML.format(name="x"))["limits"]
    for field in dataclasses.fields(LimitsConfig):
        assert f"| `limits.{field.name}` |" in table, field.name
        assert field.name in defaults, field.name
    assert FederationConfig.from_dict({"limits": defaults}).limits == LimitsConfig()  # the file shows the defaults
