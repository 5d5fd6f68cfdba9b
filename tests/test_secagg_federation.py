"""Secure aggregation through real processes: a `fedvlm-coord serve` daemon over mutual TLS, and sites that run the
real client-side protocol (fedvlm.client.secagg) either as `fedvlm-client` processes or, where a test must stop a
site at an exact point of the protocol, as protocol sites in threads of this process over their own mTLS channels.

- 5 fedvlm-client sites with secure aggregation: the global equals the plain run's within the encoding precision,
  and no update the coordinator stored is (or decodes to) a site's plain update; with one site SIGKILLed after its
  shares and one after its masked upload, the global is the survivors' weighted mean of the same updates;
- a site lost after its shares and one lost after its masked upload, and the coordinator killed and restarted in
  the middle of the round: the round completes with the survivors, equal to their plain weighted mean; status shows
  the sub-phase; the intake's refusals hold for masked updates;
- a key substituted in the coordinator's state is caught by every site before any share leaves it.
"""

from __future__ import annotations

import json
import sqlite3
import threading

import grpc
import pytest
import torch

from fedvlm import adapters
from fedvlm.algorithms import algorithm_config
from fedvlm.client.secagg import KeysDoNotVerify, SecureRound
from fedvlm.data.digits import build_digits
from fedvlm.security import secagg, signing
from fedvlm.vlm.presets import preset_dir
from fedvlm.wire.v1 import federation_pb2 as pb
from fedvlm.wire.v1 import secagg_pb2_grpc

from .harness import (
    Coordinator,
    RawSite,
    coord_cli,
    rpc_code,
    shut_down,
    small_sites,
    start_sites,
    tensors_bytes,
    wait_for,
    wait_sites_ok,
)
from .secagg_sites import SiteThread, assert_not_recoverable

pytestmark = pytest.mark.slow

PROTOCOL_CONFIG = """
name = "secagg-fed"
[run]
rounds = 1
min_clients = {n}
clients_per_round = {n}
quorum = 3
round_deadline = "{deadline}s"
poll_interval = 0.2
heartbeat_timeout = "4s"
final_eval = false
[task]
model = "tiny-llava"
[task.algorithm]
name = "fedavg"
secure_aggregation = true
"""
SHAPES = {"layer.lora_A.weight": (4, 8), "layer.lora_B.weight": (8, 4)}


def _initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _update(name: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return {n: base[n] + 0.1 * torch.randn(base[n].shape, generator=g) for n in sorted(base)}


def _count(name: str) -> int:
    return 10 + 7 * (ord(name[-1]) - ord("a"))


class _Federation:
    """A daemon with protocol sites `names`, through the initial adapter to round 1's training assignments."""

    def __init__(self, root, names: tuple[str, ...], deadline: float) -> None:
        self.coord = Coordinator(root / "coord", PROTOCOL_CONFIG.format(n=len(names), deadline=deadline))
        self.coord.start()
        self.sites = {n: RawSite(self.coord, n, root) for n in names}
        first = wait_for(lambda: (t := self.sites[names[0]].poll()).action == pb.ACTION_INIT and t, 30, "init")
        data = tensors_bytes(_initial(), {adapters.ADAPTER_CONFIG_METADATA: json.dumps({"peft_type": "LORA"})})
        self.sites[names[0]].send(self.sites[names[0]].manifest(first, data), data)
        self.tasks = wait_for(self._all_training, 60, "round 1's assignments")
        self.base = self.coord.blob(self.tasks[names[0]].global_version.digest)
        self.config = algorithm_config("fedavg", secure_aggregation=True)

    def _all_training(self):
        tasks = {n: s.poll() for n, s in self.sites.items()}
        return tasks if all(t.action == pb.ACTION_TRAIN for t in tasks.values()) else None

    def thread(self, name: str, stop_after: str = "", gate: threading.Event | None = None) -> SiteThread:
        site, task = self.sites[name], self.tasks[name]
        secure = SecureRound(secagg_pb2_grpc.SecureAggregationStub(site.channel), name, site.identity.key,
                             site.identity.ca_cert, site.identity.federation_id, task.run_id, task.round, 0.1)

        def send(masked, name=name, site=site, task=task):
            data = tensors_bytes(masked)
            site.send(site.manifest(task, data, num_examples=_count(name)), data)

        return SiteThread(secure, self.config, self.base, _update(name, self.base), _count(name), send, stop_after,
                          gate)

    def close(self) -> None:
        for site in self.sites.values():
            site.close()
        self.coord.kill()


def test_dropouts_and_a_coordinator_restart_mid_round_leave_the_round_to_the_survivors(tmp_path):
    names = ("a", "b", "c", "d", "e")
    fed = _Federation(tmp_path, names, deadline=25)
    coord = fed.coord
    try:
        gate = threading.Event()
        threads = {n: fed.thread(n, {"b": "join", "d": "upload"}.get(n, ""), gate) for n in names}
        for thread in threads.values():
            thread.start()
        for n in ("a", "c", "d", "e"):
            wait_for(threads[n].masked_ready.is_set, 60, f"{n}'s masked update")
        status = json.loads(coord_cli("status", "--dir", str(coord.fed.root), "--json"))
        assert status["phase"] == "training" and status["secure_aggregation"] == {
            "phase": "masked", "attempt": 1, "threshold": 3, "done": 0, "expected": 5}
        assert "secure aggregation masked 0/5 (threshold 3, attempt 1)" in coord_cli("status", "--dir",
                                                                                     str(coord.fed.root))
        coord.kill()  # SIGKILL in the middle of the round; the sites' secrets stay with them
        coord.start()
        gate.set()
        for thread in threads.values():
            thread.join(timeout=120)
            assert thread.error is None, getattr(thread, "trace", "")
        assert threads["b"].done == ["join"] and threads["d"].done == ["join", "upload"]
        wait_for(lambda: coord.count("globals") == 2, 90, "round 1's global")
        row = coord.query("SELECT * FROM secagg_rounds")[0]
        assert (json.loads(row["survivors_json"]), json.loads(row["dropped_json"])) == (["a", "c", "d", "e"], ["b"])
        survivors = ("a", "c", "d", "e")
        total = sum(_count(n) for n in survivors)
        expected = {k: (fed.base[k].double() + sum(_count(n) * (_update(n, fed.base)[k].double() - fed.base[k].double())
                                                   for n in survivors) / total).float() for k in SHAPES}
        digest = coord.query("SELECT digest FROM globals WHERE round=1")[0]["digest"]
        result = coord.blob(digest)
        for k in SHAPES:
            torch.testing.assert_close(result[k], expected[k], rtol=0, atol=1e-6)
        reveals = [r["reveal_json"] for r in coord.query("SELECT reveal_json FROM secagg_reveals")]
        assert len(reveals) == 3  # d was lost after its upload
        for update in coord.query("SELECT client, digest FROM updates WHERE round=1"):
            name = update["client"]
            plain = secagg.encode({k: (v.double() - fed.base[k].double()).numpy()
                                   for k, v in _update(name, fed.base).items()}, _count(name))
            assert_not_recoverable(coord.blob(update["digest"]), plain, name, reveals, 3)
        # the intake's refusals hold for masked updates: a replayed manifest, another site's signature, a late one
        site, task = fed.sites["a"], fed.tasks["a"]
        stored = coord.query("SELECT manifest_json, signature FROM updates WHERE client='a'")[0]
        replay = pb.StartUploadRequest(manifest_json=stored["manifest_json"], signature=stored["signature"])
        assert rpc_code(lambda: site.stub.StartUpload(replay, timeout=10)) == grpc.StatusCode.ALREADY_EXISTS
        data = tensors_bytes({k: torch.zeros(s, dtype=torch.uint64) for k, s in SHAPES.items()})
        forged = signing.sign(fed.sites["c"].identity.key, site.manifest(task, data).canonical())
        request = pb.StartUploadRequest(manifest_json=site.manifest(task, data).to_json(), signature=forged)
        assert rpc_code(lambda: site.stub.StartUpload(request, timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
        assert "audit log OK" in coord_cli("audit", "verify", "--dir", str(coord.fed.root))
    finally:
        fed.close()


def test_a_key_substituted_in_the_coordinator_is_caught_by_every_site(tmp_path):
    names = ("a", "b", "c")
    fed = _Federation(tmp_path, names, deadline=60)
    coord = fed.coord
    try:
        threads = {n: fed.thread(n) for n in names}
        for n in ("a", "b"):
            threads[n].start()
        wait_for(lambda: len(coord.query("SELECT client FROM secagg_keys")) == 2, 30, "a's and b's keys")
        run_id = fed.tasks["a"].run_id
        ctx = secagg.RoundContext(fed.sites["a"].identity.federation_id, run_id, 1)
        forged = secagg.SiteSecrets("a", ctx)
        db = sqlite3.connect(coord.fed.database)  # the coordinator's own state: a's keys, a's signature kept
        db.execute("PRAGMA busy_timeout=10000")
        db.execute("UPDATE secagg_keys SET advertisement_json=? WHERE client='a'",
                   (forged.advertisement().to_json(),))
        db.commit()
        db.close()
        threads["c"].start()
        for n, thread in threads.items():
            thread.join(timeout=60)
            assert isinstance(thread.error, KeysDoNotVerify), (n, thread.error)
            assert "the keys of 'a' do not verify" in str(thread.error)
        assert coord.count("secagg_shares") == 0 and coord.count("updates") == 1  # only the initial adapter
    finally:
        fed.close()


REAL_CONFIG = """
name = "secagg-real"
[run]
rounds = 1
min_clients = 5
clients_per_round = 5
quorum = {quorum}
round_deadline = "600s"
poll_interval = 0.2
heartbeat_timeout = "20s"
final_eval = false
[task]
model = "tiny-llava"
[task.train]
local_epochs = 0.1
batch_size = 4
lr = 0.001
max_steps = 2
[task.algorithm]
name = "fedavg"
secure_aggregation = {secure}
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    preset_dir("tiny-llava", path)
    return path


def _real_run(root, site_dirs, cache, secure: bool, quorum: int = 5, kill=None):
    """One round of 5 fedvlm-client sites; `kill(coord, clients)` may SIGKILL some while it runs (those need not
    exit 0). Returns ({round: global}, {site: stored update}, {site: num_examples}, round 1's seconds)."""
    coord = Coordinator(root / "coord", REAL_CONFIG.format(secure=str(secure).lower(), quorum=quorum))
    coord.start()
    clients = {}
    try:
        clients = start_sites(coord, site_dirs, root, cache)
        killed = kill(coord, clients) if kill else set()
        wait_sites_ok({n: p for n, p in clients.items() if n not in killed}, root, timeout=600)
        digests = {r["round"]: r["digest"] for r in coord.query("SELECT round, digest FROM globals")}
        rows = coord.query("SELECT client, digest, num_examples FROM updates WHERE round=1")
        updates = {r["client"]: coord.blob(r["digest"]) for r in rows}
        (times,) = coord.query("SELECT started_at, finished_at FROM rounds WHERE round=1")
        return ({n: coord.blob(d) for n, d in digests.items()}, updates,
                {r["client"]: r["num_examples"] for r in rows}, times["finished_at"] - times["started_at"])
    finally:
        shut_down(coord, clients.values())


def _kill_one_before_and_one_after_upload(coord, clients) -> set[str]:
    """site-2 once every site has sent its shares (it is building or training: it has not uploaded), site-4 as soon
    as its masked update is accepted."""
    wait_for(lambda: coord.query("SELECT phase FROM secagg_rounds WHERE phase='masked'"), 300, "the masked phase")
    clients["site-2"].kill()
    wait_for(lambda: coord.query("SELECT 1 FROM updates WHERE round=1 AND client='site-4'"), 300, "site-4's upload")
    clients["site-4"].kill()
    return {"site-2", "site-4"}


def test_five_fedvlm_client_sites_give_the_plain_runs_global_also_when_two_are_killed(tmp_path, cache):
    layout = build_digits(tmp_path / "data", sites=5, seed=0)
    site_dirs = small_sites(layout.root, tmp_path / "small", 5, train=16, test=4)
    plain_globals, plain_updates, counts, _ = _real_run(tmp_path / "plain", site_dirs, cache, secure=False)
    secure_globals, masked, _, _ = _real_run(tmp_path / "secure", site_dirs, cache, secure=True)
    for number in (0, 1):
        for key, value in plain_globals[number].items():
            torch.testing.assert_close(secure_globals[number][key], value, rtol=0, atol=1e-6)
    base = plain_globals[0]
    assert any(not torch.equal(plain_globals[1][k], base[k]) for k in base)  # it trained
    for name, update in masked.items():  # what the coordinator stored is not (and does not decode to) the update
        assert {t.dtype for t in update.values()} == {torch.uint64}
        for key, value in plain_updates[name].items():
            delta = counts[name] * (value.double() - base[key].double())
            decoded = torch.from_numpy(secagg.decode({key: update[key].numpy()})[key])
            assert not torch.allclose(decoded, delta, atol=1.0)
    assert all("secure aggregation keys of site-1, site-2, site-3, site-4, site-5 verified"
               in (tmp_path / "secure" / f"site-{i}.log").read_text() for i in range(1, 6))
    # site-2 killed after its shares, site-4 after its masked upload: the survivors' weighted mean of the same updates,
    # without waiting for the 10-minute deadline (the masked and unmask sub-phases close once the dead are silent)
    killed_globals, killed_masked, _, seconds = _real_run(tmp_path / "killed", site_dirs, cache, secure=True,
                                                          quorum=3, kill=_kill_one_before_and_one_after_upload)
    assert seconds < 300
    survivors = ["site-1", "site-3", "site-4", "site-5"]
    assert sorted(killed_masked) == survivors
    total = sum(counts[n] for n in survivors)
    for key, value in base.items():
        expected = value.double() + sum(counts[n] * (plain_updates[n][key].double() - value.double())
                                        for n in survivors) / total
        torch.testing.assert_close(killed_globals[1][key], expected.to(value.dtype), rtol=0, atol=1e-6)
