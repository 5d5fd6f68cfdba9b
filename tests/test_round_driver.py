"""The round state machine in process: `RoundDriver` on an in-memory state, updates through the real `Intake`, a
fake clock for deadlines and heartbeats. Each transition of docs/operations.md ("The round, phase by phase") and its
edge cases, without a daemon (tests/test_federation.py and tests/test_protocol.py prove the same over gRPC)."""

from __future__ import annotations

import pytest
import torch

from fedvlm import adapters
from fedvlm.algorithms.base import sample_clients
from fedvlm.coordinator.config import RunConfig
from fedvlm.coordinator.errors import Refused
from fedvlm.coordinator.rounds import RoundDriver
from fedvlm.coordinator.state import AssignmentState, MetricsKind, RoundPhase, RunState
from fedvlm.coordinator.status import snapshot
from fedvlm.security import signing
from fedvlm.security.signing import GlobalRecord
from fedvlm.spec import TaskSpec

from .inprocess import FEDERATION_ID, InProcessCoordinator, tensors

# Sites send distinct bytes (two identical updates in one round would share a digest) with the same mean.
SPREAD = {"a": -0.5, "b": 0.0, "c": 0.5}
THREE = RunConfig(rounds=2, min_clients=3, clients_per_round=3, quorum=2, round_deadline=100.0, final_eval=False)


def sampled(coord: InProcessCoordinator) -> list[str]:
    run = coord.run
    return sorted(coord.state.assignments(run.run_id, run.round))


def test_a_run_is_created_once_and_waits_for_its_initial_adapter(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    run = coord.driver.ensure_run()
    assert coord.driver.ensure_run().run_id == run.run_id
    assert run.state is RunState.INIT and run.round == 0 and run.task == coord.config.task
    assert run.config == THREE
    coord.driver.tick()
    assert coord.run.state is RunState.INIT  # nothing to adopt yet
    assert [e.entry["kind"] for e in coord.state.audit_entries()][-1] == "run"


def test_the_initial_adapter_becomes_global_zero_and_round_one_waits(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    digest = coord.start_round_one(tensors(0.5))
    run = coord.run
    assert run.state is RunState.RUNNING and run.round == 1
    assert adapters.schema_from_json(run.schema_json) == adapters.schema_of(tensors(0.5))
    rnd = coord.state.round(run.run_id, 1)
    assert rnd.base_digest == digest and rnd.attempt == 1
    version = coord.state.global_version(run.run_id, 0)
    record = GlobalRecord.from_json(version.record_json)
    signing.verify(coord.server_cert, record.canonical(), version.signature)
    assert record.parent_digest == "" and record.contributors == (digest,)


def test_the_init_site_going_offline_lets_another_site_claim_it(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    run = coord.driver.ensure_run()
    coord.heartbeat("a")
    coord.state.claim_init(run.run_id, "a")
    assert coord.state.claim_init(run.run_id, "b").init_client == "a"  # already claimed
    coord.driver.tick()
    assert coord.run.init_client == "a"  # still live
    coord.clock.advance(THREE.heartbeat_timeout + 1)
    coord.driver.tick()
    assert coord.run.init_client is None
    assert coord.state.claim_init(run.run_id, "b").init_client == "b"


def test_a_round_waits_for_min_clients_then_samples_deterministically(tmp_path):
    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=1, min_clients=3, clients_per_round=2, quorum=1,
                                                     round_deadline=100.0), names=("a", "b", "c", "d"))
    coord.start_round_one()  # only a is live: 1 < min_clients 3
    coord.heartbeat("b")
    coord.driver.tick()
    assert coord.state.round(coord.run.run_id, 1).phase is RoundPhase.WAITING and sampled(coord) == []
    coord.heartbeat("c")
    coord.driver.tick()
    run = coord.run
    rnd = coord.state.round(run.run_id, 1)
    assert rnd.phase is RoundPhase.TRAINING and rnd.deadline == coord.clock() + 100.0
    assert sampled(coord) == sample_clients(run.run_id, 1, 1, ["a", "b", "c"], 2)


def test_all_updates_in_aggregate_the_weighted_mean_and_open_the_next_round(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    coord.open_round_one(tensors(0.0))
    for name, value, count in (("a", 1.0, 10), ("b", 2.0, 30), ("c", 4.0, 60)):
        coord.send(name, tensors(value), num_examples=count)
    assert coord.accepted_signals == 4  # the initial adapter and three updates woke the driver
    coord.driver.tick()
    run = coord.run
    assert run.round == 2 and run.state is RunState.RUNNING
    merged = coord.global_tensors(1)
    assert torch.allclose(merged["layer.lora_A.weight"], torch.full((2, 3), (10 + 60 + 240) / 100))
    done = coord.state.round(run.run_id, 1)
    assert done.phase is RoundPhase.DONE and done.global_digest == coord.state.latest_global(run.run_id).digest
    nxt = coord.state.round(run.run_id, 2)
    assert nxt.base_digest == done.global_digest
    assert nxt.phase is RoundPhase.TRAINING  # the same tick sampled it: every site is live
    record = GlobalRecord.from_json(coord.state.global_version(run.run_id, 1).record_json)
    assert record.parent_digest == coord.state.global_version(run.run_id, 0).digest
    assert len(record.contributors) == 3


def test_the_deadline_with_a_quorum_aggregates_and_marks_the_rest_late(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    coord.open_round_one()
    coord.send("a", tensors(1.0))
    coord.send("b", tensors(3.0))
    coord.driver.tick()
    assert coord.run.round == 1  # c is still pending and the deadline is ahead
    coord.clock.advance(101)
    coord.heartbeat()
    coord.driver.tick()
    run = coord.run
    assert run.round == 2
    assert coord.state.assignments(run.run_id, 1) == {"a": AssignmentState.ACCEPTED, "b": AssignmentState.ACCEPTED,
                                                      "c": AssignmentState.LATE}
    assert torch.allclose(coord.global_tensors(1)["layer.lora_B.weight"], torch.full((3, 2), 2.0))
    assert coord.state.assignment(run.run_id, 2, "c") is AssignmentState.ASSIGNED  # late in 1, sampled for 2
    status = {c["name"]: c["state"] for c in snapshot(coord.state, live=True)["clients"]}
    assert status == {"a": "idle", "b": "idle", "c": "idle"}


def test_a_round_closes_before_its_deadline_once_its_pending_sites_stop_heartbeating(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    coord.open_round_one()
    coord.send("a", tensors(1.0))
    coord.send("b", tensors(3.0))
    half = THREE.heartbeat_timeout / 2
    coord.clock.advance(half)
    coord.heartbeat("a", "b")
    coord.driver.tick()
    assert coord.run.round == 1  # c has been silent for less than the heartbeat timeout: it may still upload
    coord.clock.advance(half + 1)
    coord.heartbeat("a", "b")
    coord.driver.tick()
    run = coord.run
    assert run.round == 2 and coord.clock() < coord.state.round(run.run_id, 1).deadline
    assert coord.state.assignment(run.run_id, 1, "c") is AssignmentState.LATE
    assert torch.allclose(coord.global_tensors(1)["layer.lora_B.weight"], torch.full((3, 2), 2.0))


def test_a_restarted_coordinator_gives_the_sites_a_heartbeat_timeout_to_reach_it(tmp_path):
    """Sites cannot heartbeat while the coordinator is down: their stale last-seen times do not close the round."""
    coord = InProcessCoordinator(tmp_path, THREE)
    coord.open_round_one()
    coord.send("a", tensors(1.0))
    coord.send("b", tensors(3.0))
    coord.clock.advance(THREE.heartbeat_timeout + 1)  # the coordinator was down that long
    coord.driver = RoundDriver(coord.state, coord.blobs, coord.config, FEDERATION_ID, coord.server_key)
    coord.driver.tick()
    assert coord.run.round == 1
    coord.heartbeat("a", "b")
    coord.clock.advance(THREE.heartbeat_timeout + 1)
    coord.driver.tick()
    assert coord.run.round == 2  # c never came back


def test_the_deadline_without_a_quorum_reopens_the_round_and_keeps_accepted_updates(tmp_path):
    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=1, min_clients=3, clients_per_round=2, quorum=2,
                                                     round_deadline=100.0, final_eval=False),
                                 names=("a", "b", "c", "d"))
    coord.open_round_one()
    first = sampled(coord)
    coord.send(first[0], tensors(1.0))
    coord.clock.advance(101)
    coord.heartbeat()
    coord.driver.tick()  # reopened, then sampled again at once (enough sites are live)
    run = coord.run
    rnd = coord.state.round(run.run_id, 1)
    assert rnd.attempt == 2 and rnd.phase is RoundPhase.TRAINING and rnd.deadline == coord.clock() + 100.0
    states = coord.state.assignments(run.run_id, 1)
    assert states[first[0]] is AssignmentState.ACCEPTED
    resampled = [n for n, s in states.items() if s is AssignmentState.ASSIGNED]
    assert len(resampled) == 1 and first[0] not in resampled  # one more is needed, never the accepted site
    assert resampled == sample_clients(run.run_id, 1, 2, sorted({"a", "b", "c", "d"} - {first[0]}), 1)
    coord.send(resampled[0], tensors(3.0))
    coord.driver.tick()
    assert coord.run.state is RunState.DONE
    assert torch.allclose(coord.global_tensors(1)["layer.lora_A.weight"], torch.full((2, 3), 2.0))


def test_a_late_update_is_refused_after_the_deadline_even_before_the_driver_ticks(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    coord.open_round_one()
    coord.clock.advance(101)
    with pytest.raises(Refused) as refused:
        coord.send("a", tensors(1.0))
    assert refused.value.code == "DEADLINE_EXCEEDED"
    assert coord.state.accepted_updates(coord.run.run_id, 1) == []


def send_all(coord: InProcessCoordinator, value: float) -> None:
    """Every site of THREE sends an update of mean `value` (equal example counts)."""
    for name in ("a", "b", "c"):
        coord.send(name, tensors(value + SPREAD[name]))


def evaluating(tmp_path) -> InProcessCoordinator:
    """A one-round run with final evaluation, its round aggregated by a tick."""
    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=1, min_clients=3, clients_per_round=3, quorum=3,
                                                     round_deadline=100.0, final_eval=True))
    coord.open_round_one()
    send_all(coord, 1.0)
    coord.driver.tick()
    return coord


def test_the_last_round_asks_live_sites_for_a_final_evaluation_then_finishes(tmp_path):
    coord = evaluating(tmp_path)
    run = coord.run
    assert run.state is RunState.EVALUATING and run.round == 2
    evaluation = coord.state.round(run.run_id, 2)
    assert evaluation.phase is RoundPhase.EVALUATING and evaluation.deadline == coord.clock() + 100.0
    assert set(coord.state.assignments(run.run_id, 2)) == {"a", "b", "c"}
    final = coord.state.latest_global(run.run_id).digest
    for name in ("a", "b"):
        coord.state.record_metrics(run.run_id, 1, name, MetricsKind.EVAL, final, {"accuracy": 0.5})
    coord.driver.tick()
    assert coord.run.state is RunState.EVALUATING  # c has not reported and the deadline is ahead
    coord.state.record_metrics(run.run_id, 1, "c", MetricsKind.EVAL, final, {"accuracy": 1.0})
    coord.driver.tick()
    run = coord.run
    assert run.state is RunState.DONE and run.round == 1
    assert coord.state.round(run.run_id, 2).phase is RoundPhase.DONE
    assert coord.state.audit_entries()[-1].entry["kind"] == "run_done"
    rounds = snapshot(coord.state, live=False)["rounds"]
    assert rounds[-1]["eval_metrics"]["accuracy"] == (0.5 + 0.5 + 1.0) / 3


def test_the_final_evaluation_ends_at_its_deadline_without_every_report(tmp_path):
    coord = evaluating(tmp_path)
    coord.clock.advance(101)
    coord.driver.tick()
    assert coord.run.state is RunState.DONE


def test_without_final_evaluation_the_run_is_done_after_the_last_round(tmp_path):
    coord = InProcessCoordinator(tmp_path, THREE)
    coord.open_round_one()
    for number in (1, 2):
        send_all(coord, number)
        coord.driver.tick()
    run = coord.run
    assert run.state is RunState.DONE and run.round == 2
    assert [g.round for g in coord.state.globals(run.run_id)] == [0, 1, 2]
    coord.driver.tick()  # nothing left to do
    assert coord.state.round(run.run_id, 3) is None


def test_a_new_driver_resumes_from_the_stored_state_with_the_server_state_of_the_last_global(tmp_path):
    """FedAvgM keeps a momentum: round 2, aggregated by a driver created after round 1 (a restarted coordinator),
    starts from the momentum stored with global 1 and gives the same global as an uninterrupted run."""
    task = TaskSpec.from_dict({"algorithm": {"name": "fedavgm", "server_lr": 0.5, "server_momentum": 0.9}})
    results = []
    for restart in (False, True):
        coord = InProcessCoordinator(tmp_path / str(restart), THREE, task)
        coord.open_round_one(tensors(0.0))
        for number, value in ((1, 1.0), (2, 3.0)):
            if restart and number == 2:  # round 2 is open; the coordinator restarts before its updates arrive
                coord.driver = RoundDriver(coord.state, coord.blobs, coord.config, FEDERATION_ID, coord.server_key)
            send_all(coord, value)
            coord.driver.tick()
        ref = coord.run.server_state
        assert ref.round == 2 and ref.digest
        results.append(coord.global_tensors(2)["layer.lora_A.weight"])
    v1 = 1.0
    v2 = 0.9 * v1 + (3.0 - 0.5 * v1)  # the round-2 delta is taken against global 1 = 0.5 * v1
    assert torch.allclose(results[0], torch.full((2, 3), 0.5 * v1 + 0.5 * v2))
    assert torch.equal(results[0], results[1])


def test_server_metrics_are_recorded_with_their_global(tmp_path):
    task = TaskSpec.from_dict({"algorithm": {"clip_norm": 0.1}})
    coord = InProcessCoordinator(tmp_path, THREE, task)
    coord.open_round_one()
    send_all(coord, 1.0)
    coord.driver.tick()
    reports = coord.state.metrics(coord.run.run_id, MetricsKind.SERVER)
    assert [(r.round, r.client, r.metrics) for r in reports] == [(1, "@coordinator", {"clipped_updates": 3.0})]
    assert reports[0].global_digest == coord.state.global_version(coord.run.run_id, 1).digest
    assert snapshot(coord.state, live=True)["rounds"][1]["server_metrics"] == {"clipped_updates": 3.0}
