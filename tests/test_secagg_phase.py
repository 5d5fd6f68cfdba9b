"""Secure aggregation in the coordinator's state machine, in process: the real round driver, intake, state layer and
SecureAggregation service (called without gRPC), and the real site-side SecureRound in threads.

- 5 sites: the global equals the plain FedAvg run's within the fixed-point resolution, and the stored masked
  updates do not give any site's update back, not even with the self mask removed by the revealed shares;
- sites lost after their shares and after their masked upload: the round completes with the survivors;
- below the threshold the attempt is abandoned cleanly and the round samples again;
- a key substituted in the coordinator's state is caught by every site before it sends a share;
- refusals: the config keys, a masked upload out of phase or from a site that did not share, a plain update.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fedvlm import adapters
from fedvlm.algorithms import algorithm_config
from fedvlm.algorithms.secure_sum import site_delta
from fedvlm.client.secagg import KeysDoNotVerify, RoundOver, SecureRound
from fedvlm.coordinator.config import FederationConfig, RunConfig
from fedvlm.coordinator.errors import Refused
from fedvlm.coordinator.state import AssignmentState, MetricsKind, RoundPhase, SecAggPhase
from fedvlm.security import secagg
from fedvlm.spec import SpecError, TaskSpec

from .harness import wait_for
from .inprocess import FEDERATION_ID, InProcessCoordinator
from .secagg_sites import LocalStub, SiteThread, assert_not_recoverable, local_service

NAMES = ("a", "b", "c", "d", "e")
SHAPES = {"layer.lora_A.weight": (4, 6), "layer.lora_B.weight": (6, 4)}
RUN = RunConfig(rounds=2, min_clients=5, clients_per_round=5, quorum=3, round_deadline=100.0,
                heartbeat_timeout=10.0, final_eval=False)


def _task(secure: bool, name: str = "fedavg", **algorithm) -> TaskSpec:
    return TaskSpec(algorithm=algorithm_config(name, secure_aggregation=secure, **algorithm))


def _initial() -> dict[str, torch.Tensor]:
    return {n: torch.full(s, 0.5) for n, s in SHAPES.items()}


def _update(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(NAMES.index(name))
    return {n: (torch.randn(s, generator=g) * 0.1 + 0.5).float() for n, s in SHAPES.items()}


COUNTS = {n: 10 * (i + 1) for i, n in enumerate(NAMES)}


def _secure_round(coord: InProcessCoordinator, name: str) -> SecureRound:
    run = coord.run
    stub = LocalStub(coord.service, name, coord.certs[name])
    return SecureRound(stub, name, coord.keys[name], coord.ca_cert, FEDERATION_ID, run.run_id, run.round, 0.005)


def _coordinator(tmp_path, secure: bool = True, **algorithm) -> InProcessCoordinator:
    coord = InProcessCoordinator(tmp_path, RUN, _task(secure, **algorithm), NAMES)
    coord.service = local_service(coord.state, FEDERATION_ID)
    coord.open_round_one(_initial())
    return coord


def _play(coord: InProcessCoordinator, stop_after: dict[str, str] | None = None, lost: tuple[str, ...] = (),
          timeout: float = 30.0, errors: bool = False, silent: tuple[str, ...] = ()) -> dict[str, SiteThread]:
    """Every sampled site's secure round in a thread while the driver ticks; when nothing moves for a while the
    clock goes forward (deadlines pass) and the started sites heartbeat, but for the `silent` ones. `lost` sites are
    not started; returns the threads once round 1 is over (a site's error fails the test unless `errors`)."""
    stop_after = stop_after or {}
    config = coord.run.task.algorithm
    base = {n: t for n, t in coord.global_tensors(0).items()}
    threads = {}
    for name in sorted(coord.state.assignments(coord.run.run_id, 1)):
        if name in lost:
            continue

        def send(masked, name=name):
            coord.send(name, masked, num_examples=COUNTS[name])

        threads[name] = SiteThread(_secure_round(coord, name), config, base, _update(name), COUNTS[name], send,
                                   stop_after.get(name, ""))
    for thread in threads.values():
        thread.start()
    started, idle = time.monotonic(), 0
    while time.monotonic() - started < timeout:
        rnd = coord.state.round(coord.run.run_id, 1)
        if rnd.phase is RoundPhase.DONE or rnd.attempt > 1:
            break
        before = coord.state.secagg_round(coord.run.run_id, 1, 1)
        coord.driver.tick()
        if coord.state.secagg_round(coord.run.run_id, 1, 1) == before:
            idle += 1
            if idle > 100:  # the live sites wait for the coordinator: let the current deadline pass
                coord.clock.advance(20.0)
                coord.heartbeat(*(n for n in threads if n not in silent))  # their agents heartbeat meanwhile
                idle = 0
        else:
            idle = 0
        time.sleep(0.005)
    for thread in threads.values():
        thread.join(timeout=5)
        assert errors or thread.error is None, getattr(thread, "trace", "")
    return threads


def _plain_global(tmp_path, names, **algorithm) -> dict[str, torch.Tensor]:
    """Round 1's global of the same federation without secure aggregation, from the same updates of `names`."""
    coord = InProcessCoordinator(tmp_path / "plain", RUN, _task(False, **algorithm), NAMES)
    coord.open_round_one(_initial())
    for name in names:
        coord.send(name, _update(name), num_examples=COUNTS[name])
    coord.clock.advance(101)
    coord.driver.tick()
    return coord.global_tensors(1)


def _assert_close(actual, expected) -> None:
    for name in expected:
        # float32 globals; the encoding's own error is below 5 * 2**-32 per coordinate
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-7)


def test_five_sites_give_the_plain_global_and_no_stored_update_reveals_its_site(tmp_path):
    coord = _coordinator(tmp_path)
    threads = _play(coord)
    assert all(t.done == ["join", "upload", "reveal"] for t in threads.values())
    assert coord.run.round == 2
    _assert_close(coord.global_tensors(1), _plain_global(tmp_path, NAMES))
    run_id = coord.run.run_id
    updates = coord.state.accepted_updates(run_id, 1)
    stored = {u.client: adapters.from_bytes(coord.blobs.read(u.digest)) for u in updates}
    assert sorted(stored) == list(NAMES)
    reveals = list(coord.state.secagg_reveals(run_id, 1, 1).values())
    threshold = coord.state.secagg_round(run_id, 1, 1).threshold
    base = _initial()
    for name, tensors in stored.items():
        plain = secagg.encode({n: (v.double() - base[n].double()).numpy() for n, v in _update(name).items()},
                              COUNTS[name])
        assert_not_recoverable(tensors, plain, name, reveals, threshold)


def test_sites_lost_after_sharing_and_after_uploading_leave_the_round_to_the_survivors(tmp_path):
    coord = _coordinator(tmp_path)
    restarted: dict[str, BaseException] = {}

    def b_restarts() -> None:  # b's agent, restarted after its shares, has lost its secrets: it sits the round out
        wait_for(lambda: coord.state.secagg_round(coord.run.run_id, 1, 1).phase is SecAggPhase.MASKED, 30, "masked")
        secure = _secure_round(coord, "b")
        try:
            secure.join()
        except RoundOver as exc:
            restarted["join"] = exc
            secure.sit_out()
            restarted["sat out until"] = coord.state.round(coord.run.run_id, 1).phase

    thread = threading.Thread(target=b_restarts, daemon=True)
    thread.start()
    threads = _play(coord, stop_after={"b": "join", "d": "upload"})
    thread.join(timeout=10)
    assert "round 1 is masked without this site's keys" in str(restarted["join"])
    assert restarted["sat out until"] is RoundPhase.DONE
    assert threads["b"].done == ["join"] and threads["d"].done == ["join", "upload"]
    sa = coord.state.secagg_round(coord.run.run_id, 1, 1)
    assert (sa.survivors, sa.dropped) == (("a", "c", "d", "e"), ("b",))
    assert sorted(coord.state.secagg_reveals(coord.run.run_id, 1, 1)) == ["a", "c", "e"]
    assert coord.run.round == 2
    _assert_close(coord.global_tensors(1), _plain_global(tmp_path, ["a", "c", "d", "e"]))


def test_a_sharer_that_goes_silent_does_not_hold_the_masked_phase_until_the_round_deadline(tmp_path):
    coord = _coordinator(tmp_path)
    started = coord.clock()
    threads = _play(coord, stop_after={"b": "join"}, silent=("b",))
    assert threads["b"].done == ["join"]
    sa = coord.state.secagg_round(coord.run.run_id, 1, 1)
    assert (sa.survivors, sa.dropped) == (("a", "c", "d", "e"), ("b",))
    assert coord.run.round == 2 and coord.clock() - started < RUN.round_deadline
    _assert_close(coord.global_tensors(1), _plain_global(tmp_path, ["a", "c", "d", "e"]))


@pytest.mark.parametrize("name", ["fedprox", "fedavgm", "fedadam"])
def test_the_server_steps_with_state_take_the_plain_step_on_the_unmasked_mean(tmp_path, name):
    coord = _coordinator(tmp_path, name=name)
    _play(coord)
    _assert_close(coord.global_tensors(1), _plain_global(tmp_path, NAMES, name=name))


def test_below_the_threshold_the_attempt_is_abandoned_and_the_round_samples_again(tmp_path):
    coord = _coordinator(tmp_path, secagg_threshold=4)
    threads = _play(coord, stop_after={"a": "join", "b": "join"}, errors=True)
    for name in ("c", "d", "e"):  # they uploaded, then learn that the attempt is over
        assert isinstance(threads[name].error, RoundOver) and "abandoned" in str(threads[name].error)
    run_id = coord.run.run_id
    sa = coord.state.secagg_round(run_id, 1, 1)
    assert sa.phase is SecAggPhase.ABANDONED and "3 of 5 sites completed phase masked" in sa.reason
    rnd = coord.state.round(run_id, 1)
    assert (rnd.phase, rnd.attempt, coord.run.round) == (RoundPhase.TRAINING, 2, 1)  # sampled afresh at once
    assert coord.state.accepted_updates(run_id, 1) == []  # the attempt's masked updates are dropped
    assert set(coord.state.assignments(run_id, 1).values()) == {AssignmentState.ASSIGNED}
    assert coord.state.global_version(run_id, 1) is None
    coord.driver.tick()  # attempt 2 opens its own secure aggregation
    assert coord.state.secagg_round(run_id, 1, 2).phase is SecAggPhase.KEYS


def test_a_key_substituted_by_the_coordinator_is_caught_before_any_share_is_sent(tmp_path):
    coord = _coordinator(tmp_path)
    run_id = coord.run.run_id
    coord.driver.tick()  # the attempt collects keys
    forged = secagg.SiteSecrets("c", secagg.RoundContext(FEDERATION_ID, run_id, 1)).advertisement()
    original = coord.state.record_secagg_keys

    def substitute(run, number, attempt, client, advertisement_json, signature, cert_pem):
        if client == "c":  # the site's signature kept, its public keys replaced by the coordinator's own
            advertisement_json = forged.to_json()
        original(run, number, attempt, client, advertisement_json, signature, cert_pem)

    coord.state.record_secagg_keys = substitute
    threads = _play(coord, timeout=10, errors=True)
    for name, thread in threads.items():
        assert isinstance(thread.error, KeysDoNotVerify), (name, thread.error)
        message = str(thread.error)
        assert ("keys of 'c' do not verify" in message) or (name == "c" and "own keys were replaced" in message)
    assert coord.state.secagg_sharers(run_id, 1, 1) == [] and coord.state.accepted_updates(run_id, 1) == []


def test_masked_uploads_are_refused_out_of_phase_from_non_sharers_and_in_the_clear(tmp_path):
    coord = _coordinator(tmp_path)
    masked = {n: torch.zeros(s, dtype=torch.uint64) for n, s in SHAPES.items()}
    coord.driver.tick()
    with pytest.raises(Refused, match="not collecting masked updates \\(it is in phase keys\\)"):
        coord.send("a", masked)
    _play(coord, stop_after={n: "join" for n in NAMES}, timeout=3)  # everyone shares, nobody uploads yet
    assert coord.state.secagg_round(coord.run.run_id, 1, 1).phase is SecAggPhase.MASKED
    with pytest.raises(Refused, match="expected U64 got F32"):
        coord.send("a", _update("a"))
    sa = coord.state.secagg_round(coord.run.run_id, 1, 1)
    coord.state._db.execute("UPDATE secagg_rounds SET sharers_json='[\"b\",\"c\",\"d\",\"e\"]'")
    with pytest.raises(Refused, match="you did not send your shares"):
        coord.send("a", masked)
    assert sa.sharers == NAMES


@pytest.mark.parametrize(("algorithm", "message"), [
    ({"aggregator": "median"}, "needs the mean aggregator: median needs each site's update"),
    ({"aggregator": "trimmed_mean"}, "needs the mean aggregator: trimmed_mean"),
    ({"aggregator": "krum"}, "needs the mean aggregator: krum"),
    ({"lora_exact": True}, 'not with lora_aggregation = "exact"'),
    ({"lora_aggregation": "flora"}, 'not with lora_aggregation = "flora"'),
    ({"lora_aggregation": "ffa"}, 'not with lora_aggregation = "ffa"'),
    ({"lora_aggregation": "rolora"}, 'not with lora_aggregation = "rolora"'),
    ({"name": "scaffold"}, "not supported by scaffold"),
])
def test_algorithms_that_need_each_update_are_refused_with_one_line(algorithm, message):
    table = {"name": "fedavg", "secure_aggregation": True, **algorithm}
    with pytest.raises(SpecError, match=f"^task.algorithm.secure_aggregation: {message}"):
        FederationConfig.from_dict({"task": {"algorithm": table}})
    for name in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"):
        assert FederationConfig.from_dict({"task": {"algorithm": {"name": name, "secure_aggregation": True}}})


def test_the_threshold_is_checked_against_the_sampled_sites():
    run = {"clients_per_round": 4, "min_clients": 4, "quorum": 2}
    for bad in (2, 5):
        with pytest.raises(SpecError, match=f"^task.algorithm.secagg_threshold: threshold {bad} for 4 sites"):
            FederationConfig.from_dict({"run": run, "task": {"algorithm": {"secure_aggregation": True,
                                                                           "secagg_threshold": bad}}})
    with pytest.raises(SpecError, match="^task.algorithm.secagg_threshold: must be >= 0"):
        FederationConfig.from_dict({"task": {"algorithm": {"secagg_threshold": -1}}})
    assert FederationConfig.from_dict({"run": run, "task": {"algorithm": {"secure_aggregation": True,
                                                                          "secagg_threshold": 3}}})


def test_with_central_dp_the_sites_clip_and_weigh_equally_and_the_noise_comes_after_unmasking(tmp_path):
    """The sites clip their own deltas and weigh 1; the server step adds its noise (here negligible) to the unmasked
    mean of the clipped deltas and accounts the round, as in the plain run."""
    coord = _coordinator(tmp_path, clip_norm=0.05, dp_noise_multiplier=1e-9)
    _play(coord)
    assert coord.run.round == 2
    config, base = coord.run.task.algorithm, _initial()
    deltas = [site_delta(config, base, _update(n)) for n in NAMES]
    assert all(np.sqrt(sum(np.square(v).sum() for v in d.values())) == pytest.approx(0.05) for d in deltas)
    expected = {n: (base[n].double() + sum(torch.from_numpy(d[n]) for d in deltas) / len(NAMES)).float()
                for n in SHAPES}
    _assert_close(coord.global_tensors(1), expected)
    server = {m.round: m.metrics for m in coord.state.metrics(coord.run.run_id, MetricsKind.SERVER)}
    assert server[1]["dp_rounds"] == 1 and server[1]["dp_epsilon"] > 0
