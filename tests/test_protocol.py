"""The coordinator's security and state contract, exercised over real mTLS gRPC against a real daemon process.

Sites here speak the wire protocol directly (real enrollment, real certificates, hand-made adapters), so every
refusal can be provoked precisely; each refusal must leave the accepted state unchanged.
"""

from __future__ import annotations

import json
import time

import grpc
import pytest
import torch

from fedvlm import adapters
from fedvlm.client.identity import EnrollmentError, StateDir
from fedvlm.security import pki
from fedvlm.wire.v1 import federation_pb2 as pb
from fedvlm.wire.v1 import federation_pb2_grpc

from .harness import Coordinator, RawSite, coord_cli, rpc_code, tensors_bytes, wait_for

# Real processes (a coordinator daemon, sites): the slow half of `make test`.
pytestmark = pytest.mark.slow

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
max_update_mb = 0.05
final_eval = false
[task]
model = "tiny-llava"
"""


def init_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.lora_A.weight": torch.randn(4, 8, generator=g),
            "layer.lora_B.weight": torch.randn(8, 4, generator=g)}


def accepted_state(coord: Coordinator) -> tuple[int, int, int]:
    return coord.count("updates"), coord.count("nonces"), coord.count("globals")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A coordinator whose run is in round 1 with sites a and b sampled; site c is enrolled but never sampled."""
    root = tmp_path_factory.mktemp("protocol")
    coord = Coordinator(root / "coord", CONFIG)
    coord.start()
    sites = {name: RawSite(coord, name, root) for name in ("a", "b")}
    first = sites["a"].poll()
    assert first.action == pb.ACTION_INIT, first
    metadata = {adapters.ADAPTER_CONFIG_METADATA: json.dumps({"peft_type": "LORA"})}
    data = tensors_bytes(init_tensors(), metadata)
    sites["a"].send(sites["a"].manifest(first, data), data)
    wait_for(lambda: coord.count("globals") == 1, 30, "global 0")
    task = wait_for(lambda: (t := sites["b"].poll()).action == pb.ACTION_TRAIN and t, 30, "round 1 to open")
    assert task.round == 1
    yield coord, sites, task, root
    for site in sites.values():
        site.close()
    coord.kill()


def test_round_one_hands_out_the_signed_initial_global(fed):
    coord, sites, task, _ = fed
    info = task.global_version
    from fedvlm.client.transfer import verify_global_info

    record = verify_global_info(info, sites["b"].identity.ca_cert, sites["b"].identity.federation_id, task.run_id)
    assert record.round == 0 and record.parent_digest == ""
    chunks = list(sites["b"].stub.FetchGlobal(pb.FetchGlobalRequest(digest=info.digest, offset=0), timeout=10))
    data = b"".join(c.data for c in chunks)
    assert adapters.sha256_hex(data) == info.digest
    got = adapters.from_bytes(data)
    assert all(torch.equal(got[k], v) for k, v in init_tensors().items())


def test_a_global_download_resumes_its_partial_file_and_checks_every_byte(fed, tmp_path):
    from fedvlm.client.transfer import VerificationError, download_global

    _, sites, task, _ = fed
    info, stub = task.global_version, sites["b"].stub
    full = b"".join(c.data for c in stub.FetchGlobal(pb.FetchGlobalRequest(digest=info.digest), timeout=10))
    half = len(full) // 2
    resumed, torn, kept = (tmp_path / name for name in ("resumed", "torn", "kept"))
    for folder in (resumed, torn, kept):
        folder.mkdir()
    resumed.joinpath(f"{info.digest}.part").write_bytes(full[:half])  # a download cut halfway: fetched from there
    assert download_global(stub, info, resumed) == full == resumed.joinpath(info.digest).read_bytes()
    assert not resumed.joinpath(f"{info.digest}.part").exists()
    torn.joinpath(f"{info.digest}.part").write_bytes(bytes(half))  # wrong first half: the whole does not verify
    with pytest.raises(VerificationError, match="do not match the signed digest"):
        download_global(stub, info, torn)
    assert list(torn.iterdir()) == []
    kept.joinpath(info.digest).write_bytes(full[:half] + bytes(len(full) - half))  # a kept file torn by a crash
    assert download_global(stub, info, kept) == full == kept.joinpath(info.digest).read_bytes()


def test_refused_without_client_certificate(fed):
    coord, _, _, _ = fed
    ca = coord.fed.ca_cert.read_bytes()
    channel = grpc.secure_channel(coord.address, grpc.ssl_channel_credentials(root_certificates=ca))
    stub = federation_pb2_grpc.FederationStub(channel)
    assert rpc_code(lambda: stub.Poll(pb.PollRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_refused_with_certificate_of_another_ca(fed):
    coord, _, _, _ = fed
    other_key, other_ca = pki.create_ca("intruder")
    key = pki.generate_key()
    cert = pki.issue_cert_for_key(other_key, other_ca, key.public_key(), "a", "client", 3600)
    creds = grpc.ssl_channel_credentials(root_certificates=coord.fed.ca_cert.read_bytes(),
                                         private_key=pki.key_to_pem(key), certificate_chain=pki.cert_to_pem(cert))
    stub = federation_pb2_grpc.FederationStub(grpc.secure_channel(coord.address, creds))
    assert rpc_code(lambda: stub.Poll(pb.PollRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_reused_join_token_is_refused_and_enrolls_nobody(fed):
    coord, _, _, root = fed
    token = coord.token("c")
    StateDir(root / "c1").enroll(coord.address, token)
    before = coord.query("SELECT cert_fingerprint FROM clients WHERE name='c'")
    with pytest.raises(EnrollmentError, match="already used"):
        StateDir(root / "c2").enroll(coord.address, token)
    assert coord.query("SELECT cert_fingerprint FROM clients WHERE name='c'") == before
    assert StateDir(root / "c2").load() is None


def test_expired_join_token_is_refused(fed):
    coord, _, _, root = fed
    token = coord.token("d", ttl="1s")
    time.sleep(2.1)
    with pytest.raises(EnrollmentError, match="expired"):
        StateDir(root / "d").enroll(coord.address, token)
    assert coord.query("SELECT * FROM clients WHERE name='d'") == []


@pytest.mark.parametrize("case", ["tampered", "bad-signature", "past-round", "wrong-base", "non-finite",
                                  "wrong-keys", "wrong-shape", "wrong-dtype", "over-size", "other-client",
                                  "other-rank"])
def test_bad_update_is_refused_without_state_change(fed, case):
    coord, sites, task, _ = fed
    site = sites["b"]
    tensors = init_tensors(1)
    manifest_overrides = {}
    key = None
    if case == "non-finite":
        tensors["layer.lora_A.weight"][0, 0] = float("nan")
    elif case == "wrong-keys":
        tensors["layer.lora_C.weight"] = tensors.pop("layer.lora_A.weight")
    elif case == "wrong-shape":
        tensors["layer.lora_A.weight"] = torch.zeros(4, 9)
    elif case == "wrong-dtype":
        tensors["layer.lora_A.weight"] = tensors["layer.lora_A.weight"].half()
    elif case == "over-size":
        tensors["layer.lora_A.weight"] = torch.zeros(4, 8 * 1000)
    elif case == "other-rank":  # a consistent rank-2 pair: only with task.algorithm.lora_exact
        tensors = {"layer.lora_A.weight": torch.ones(2, 8), "layer.lora_B.weight": torch.ones(8, 2)}
    data = tensors_bytes(tensors)
    if case == "tampered":
        manifest = site.manifest(task, data)
        data = tensors_bytes(init_tensors(2))
        assert len(data) == manifest.size
    else:
        if case == "past-round":
            manifest_overrides["round"] = 0
        elif case == "wrong-base":
            manifest_overrides["base_digest"] = "ab" * 32
        elif case == "bad-signature":
            key = pki.generate_key()
        elif case == "other-client":
            manifest_overrides["client"] = "a"
        manifest = site.manifest(task, data, **manifest_overrides)
    expected = {
        "tampered": grpc.StatusCode.INVALID_ARGUMENT, "bad-signature": grpc.StatusCode.UNAUTHENTICATED,
        "past-round": grpc.StatusCode.FAILED_PRECONDITION, "wrong-base": grpc.StatusCode.FAILED_PRECONDITION,
        "non-finite": grpc.StatusCode.INVALID_ARGUMENT, "wrong-keys": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong-shape": grpc.StatusCode.INVALID_ARGUMENT, "wrong-dtype": grpc.StatusCode.INVALID_ARGUMENT,
        "over-size": grpc.StatusCode.RESOURCE_EXHAUSTED, "other-client": grpc.StatusCode.PERMISSION_DENIED,
        "other-rank": grpc.StatusCode.INVALID_ARGUMENT,
    }[case]
    before = accepted_state(coord)
    try:
        site.send(manifest, data, key=key)
    except grpc.RpcError as exc:
        assert exc.code() == expected, exc.details()
        assert exc.details()  # a human-readable reason
    else:
        pytest.fail(f"{case}: update was accepted")
    assert accepted_state(coord) == before
    assert coord.query("SELECT state FROM assignments WHERE round=1 AND client='b'") == [{"state": "assigned"}]
    assert coord.count("uploads") == 0


def test_unsampled_site_cannot_upload(fed):
    coord, _, task, root = fed
    site = RawSite(coord, "e", root)
    data = tensors_bytes(init_tensors(3))
    before = accepted_state(coord)
    assert rpc_code(lambda: site.send(site.manifest(task, data), data)) == grpc.StatusCode.PERMISSION_DENIED
    assert accepted_state(coord) == before
    site.close()


def test_replayed_manifest_is_refused_then_round_aggregates_fedavg(fed):
    coord, sites, task, _ = fed
    a_task = wait_for(lambda: (t := sites["a"].poll()).action == pb.ACTION_TRAIN and t, 10, "a's assignment")
    upd_a, upd_b = init_tensors(10), init_tensors(11)
    data_a = tensors_bytes(upd_a)
    manifest_a = sites["a"].manifest(a_task, data_a, num_examples=30)
    assert sites["a"].send(manifest_a, data_a).digest == adapters.sha256_hex(data_a)
    before = accepted_state(coord)
    assert rpc_code(lambda: sites["a"].send(manifest_a, data_a)) == grpc.StatusCode.ALREADY_EXISTS
    assert accepted_state(coord) == before
    data_b = tensors_bytes(upd_b)
    sites["b"].send(sites["b"].manifest(task, data_b, num_examples=10), data_b)
    wait_for(lambda: coord.count("globals") == 2, 30, "global 1")
    row = coord.query("SELECT digest FROM globals WHERE round=1")[0]
    merged = adapters.from_bytes(coord.fed.blobs.joinpath(row["digest"][:2], row["digest"]).read_bytes())
    for name in upd_a:
        assert torch.allclose(merged[name], (30 * upd_a[name] + 10 * upd_b[name]) / 40)
    # The late-comer rule: the round is closed, so a second update for round 1 is refused.
    data = tensors_bytes(init_tensors(12))
    assert rpc_code(lambda: sites["b"].send(sites["b"].manifest(task, data), data)) in (
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS)
    assert "audit log OK" in coord_cli("audit", "verify", "--dir", str(coord.fed.root))


def test_audit_verify_detects_a_rewritten_global(fed, tmp_path):
    coord, _, _, _ = fed
    import shutil
    import sqlite3

    copy = tmp_path / "copy"
    shutil.copytree(coord.fed.root, copy, ignore=shutil.ignore_patterns("*.part"))
    db = sqlite3.connect(copy / "state.db")
    entry = db.execute("SELECT seq, entry_json FROM audit WHERE entry_json LIKE '%\"global\"%' LIMIT 1").fetchone()
    forged = entry[1].replace('"kind":"global"', '"kind":"global","forged":1')
    db.execute("UPDATE audit SET entry_json=? WHERE seq=?", (forged, entry[0]))
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match="altered"):
        coord_cli("audit", "verify", "--dir", str(copy))


def test_partial_updates_average_their_tensors_and_carry_the_rest(fed):
    """Round 2: updates may hold a subset of the global's tensors (one F-2stage stage), the same subset each."""
    coord, sites, _, _ = fed
    tasks = {n: wait_for(lambda n=n: (t := sites[n].poll()).action == pb.ACTION_TRAIN and t.round == 2 and t,
                         30, f"{n}'s round-2 assignment") for n in ("a", "b")}
    base = adapters.from_bytes(b"".join(c.data for c in sites["a"].stub.FetchGlobal(
        pb.FetchGlobalRequest(digest=tasks["a"].global_version.digest), timeout=10)))
    only_a = {"layer.lora_A.weight": torch.full((4, 8), 1.0)}
    data = tensors_bytes(only_a)
    sites["a"].send(sites["a"].manifest(tasks["a"], data), data)
    other_subset = tensors_bytes({"layer.lora_B.weight": torch.zeros(8, 4)})
    before = accepted_state(coord)
    assert rpc_code(lambda: sites["b"].send(sites["b"].manifest(tasks["b"], other_subset), other_subset)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert accepted_state(coord) == before
    data = tensors_bytes({"layer.lora_A.weight": torch.full((4, 8), 3.0)})
    sites["b"].send(sites["b"].manifest(tasks["b"], data), data)
    wait_for(lambda: coord.count("globals") == 3, 30, "global 2")
    digest = coord.query("SELECT digest FROM globals WHERE round=2")[0]["digest"]
    merged = coord.blob(digest)
    assert torch.equal(merged["layer.lora_A.weight"], torch.full((4, 8), 2.0))
    assert torch.equal(merged["layer.lora_B.weight"], base["layer.lora_B.weight"])


def test_a_waiting_sites_long_poll_is_answered_by_its_change_and_refused_once_it_is_revoked(tmp_path):
    """PollRequest.wait_s: b's poll is held while the run waits for a's initial adapter and answered when that
    changes (b polls again at once, at most a few times, until round 1 is open with its TRAIN); a heartbeat
    (wait_s 0) is answered at once; c, never sampled, is refused in the middle of its long-poll when it is revoked."""
    from concurrent.futures import ThreadPoolExecutor

    coord = Coordinator(tmp_path / "coord", CONFIG)
    coord.start()
    sites = {name: RawSite(coord, name, tmp_path) for name in ("a", "b", "c")}
    pool = ThreadPoolExecutor(2)

    def long_poll(name):
        return sites[name].stub.Poll(pb.PollRequest(state=pb.CLIENT_STATE_IDLE, wait_s=60), timeout=90)

    def last_seen(name):
        return coord.query("SELECT last_seen FROM clients WHERE name=?", (name,))[0]["last_seen"]

    def polled(name, before=None):  # its heartbeat is recorded before the call waits
        return lambda: last_seen(name) not in (None, before)

    try:
        first = sites["a"].poll()
        assert first.action == pb.ACTION_INIT, first
        heartbeat = sites["b"].poll()
        assert heartbeat.action == pb.ACTION_WAIT and not heartbeat.long_polled
        before = wait_for(lambda: last_seen("b"), 10, "b's heartbeat to be written")  # batched every 0.25 s
        held = pool.submit(long_poll, "b")
        wait_for(polled("b", before), 10, "b's long-poll")
        data = tensors_bytes(init_tensors(), {adapters.ADAPTER_CONFIG_METADATA: json.dumps({"peft_type": "LORA"})})
        sites["a"].send(sites["a"].manifest(first, data), data)
        answers = [held.result(timeout=60)]
        while answers[-1].action == pb.ACTION_WAIT and len(answers) < 4:  # e.g. "round 1: not sampled" (yet)
            answers.append(long_poll("b"))
        assert (answers[-1].action, answers[-1].round) == (pb.ACTION_TRAIN, 1)
        assert all(answer.long_polled for answer in answers)
        waiting = pool.submit(long_poll, "c")
        wait_for(polled("c"), 10, "c's poll")
        coord_cli("revoke", "c", "--dir", str(coord.fed.root))
        assert rpc_code(lambda: waiting.result(timeout=60)) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for site in sites.values():
            site.close()
        coord.kill()


def test_exact_lora_takes_updates_of_other_ranks(tmp_path):
    """task.algorithm.lora_exact: a rank-2 and a rank-4 update for a rank-4 global are both accepted and the new
    global is the rank-4 re-factorisation of the weighted mean of their products; a pair whose in/out dimension
    differs from the global's is still refused without any state change."""
    coord = Coordinator(tmp_path / "coord", CONFIG + "[task.algorithm]\nlora_exact = true\n")
    coord.start()
    sites = {name: RawSite(coord, name, tmp_path) for name in ("a", "b")}
    try:
        first = sites["a"].poll()
        assert first.action == pb.ACTION_INIT, first
        data = tensors_bytes(init_tensors(), {adapters.ADAPTER_CONFIG_METADATA: json.dumps({"peft_type": "LORA"})})
        sites["a"].send(sites["a"].manifest(first, data), data)
        wait_for(lambda: coord.count("globals") == 1, 30, "global 0")
        tasks = {}

        def both_assigned():  # both sites keep polling: the round opens once both are live
            for name, site in sites.items():
                if (task := site.poll()).action == pb.ACTION_TRAIN:
                    tasks[name] = task
            return len(tasks) == 2

        wait_for(both_assigned, 30, "round 1 to open for a and b")
        g = torch.Generator().manual_seed(7)

        def pair(rank):
            return {"layer.lora_A.weight": torch.randn(rank, 8, generator=g),
                    "layer.lora_B.weight": torch.randn(8, rank, generator=g)}

        low, full = pair(2), pair(4)
        data = tensors_bytes(low)
        sites["a"].send(sites["a"].manifest(tasks["a"], data, num_examples=30), data)
        bad_cases = ({"layer.lora_A.weight": torch.ones(2, 9), "layer.lora_B.weight": torch.ones(8, 2)},  # in
                     {"layer.lora_A.weight": torch.ones(2, 8), "layer.lora_B.weight": torch.ones(7, 2)},  # out
                     {"layer.lora_A.weight": torch.ones(2, 8), "layer.lora_B.weight": torch.ones(8, 3)},  # R != R
                     {"layer.lora_A.weight": torch.ones(2, 8)})  # half a pair of another rank
        for bad in bad_cases:
            before = accepted_state(coord)
            payload = tensors_bytes(bad)
            assert rpc_code(lambda p=payload: sites["b"].send(sites["b"].manifest(tasks["b"], p), p)) == \
                grpc.StatusCode.INVALID_ARGUMENT, bad
            assert accepted_state(coord) == before
            assert coord.query("SELECT state FROM assignments WHERE round=1 AND client='b'") == [{"state": "assigned"}]
            assert coord.count("uploads") == 0
        data = tensors_bytes(full)
        sites["b"].send(sites["b"].manifest(tasks["b"], data, num_examples=10), data)
        wait_for(lambda: coord.count("globals") == 2, 30, "global 1")
        digest = coord.query("SELECT digest FROM globals WHERE round=1")[0]["digest"]
        merged = coord.blob(digest)
        a, b = merged["layer.lora_A.weight"], merged["layer.lora_B.weight"]
        assert a.shape == (4, 8) and b.shape == (8, 4) and a.dtype == torch.float32  # the global keeps rank 4

        def product(tensors):
            return tensors["layer.lora_B.weight"].double() @ tensors["layer.lora_A.weight"].double()

        u, s, vh = torch.linalg.svd((30 * product(low) + 10 * product(full)) / 40)
        assert torch.allclose(b.double() @ a.double(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-4)
    finally:
        for site in sites.values():
            site.close()
        coord.kill()
