"""Intake in process: every refusal of an announced or received update, resumable reception and acceptance, on an
in-memory state with real certificates and signatures. A refusal changes no accepted state (updates, nonces,
assignments) and leaves no partial upload behind unless the upload may still be resumed."""

from __future__ import annotations

import pytest
import torch

from fedvlm import adapters
from fedvlm.coordinator.config import RunConfig
from fedvlm.coordinator.errors import Refused
from fedvlm.coordinator.state import AssignmentState
from fedvlm.security import pki
from fedvlm.spec import TaskSpec

from .inprocess import InProcessCoordinator, tensors

RUN = RunConfig(rounds=2, min_clients=2, clients_per_round=2, quorum=2, round_deadline=100.0, max_update_mb=1.0)


@pytest.fixture
def coord(tmp_path) -> InProcessCoordinator:
    """Round 1 open for sites a and b (c is enrolled but never sampled: min_clients = 2 live, a and b)."""
    coord = InProcessCoordinator(tmp_path, RUN)
    coord.start_round_one()
    coord.heartbeat("a", "b")
    coord.driver.tick()
    assert sorted(coord.state.assignments(coord.run.run_id, 1)) == ["a", "b"]
    return coord


def refused(fn) -> Refused:
    with pytest.raises(Refused) as info:
        fn()
    return info.value


def unchanged(coord: InProcessCoordinator) -> None:
    """Nothing of a refused update remains: no partial upload, no accepted update, assignments as sampled."""
    run = coord.run
    assert coord.state.uploads(run.run_id, run.round) == []
    assert coord.state.accepted_updates(run.run_id, run.round) == []
    assert set(coord.state.assignments(run.run_id, run.round).values()) == {AssignmentState.ASSIGNED}
    assert list(coord.intake.uploads_dir.iterdir()) == []


def test_an_update_is_accepted_atomically_and_wakes_the_driver(coord):
    data = adapters.to_bytes(tensors(1.0))
    manifest = coord.manifest("a", data)
    ticket = coord.start("a", manifest)
    assert (ticket.offset, ticket.size) == (0, len(data))
    signals = coord.accepted_signals
    digest, received = coord.intake.receive("a", iter([(ticket.upload_id, 0, data)]))
    run = coord.run
    assert (digest, received) == (manifest.sha256, len(data))
    assert coord.accepted_signals == signals + 1
    [update] = coord.state.accepted_updates(run.run_id, 1)
    assert (update.client, update.digest, update.num_examples) == ("a", digest, 10)
    assert coord.state.assignment(run.run_id, 1, "a") is AssignmentState.ACCEPTED
    assert coord.state.nonce_used(manifest.nonce) and coord.state.upload(ticket.upload_id) is None
    assert coord.blobs.read(digest) == data
    assert refused(lambda: coord.start("a", coord.manifest("a", data))).code == "ALREADY_EXISTS"  # accepted once


@pytest.mark.parametrize(("case", "code"), [
    ("bad-signature", "UNAUTHENTICATED"),
    ("other-client", "PERMISSION_DENIED"),
    ("other-federation", "FAILED_PRECONDITION"),
    ("other-run", "FAILED_PRECONDITION"),
    ("wrong-round", "FAILED_PRECONDITION"),
    ("wrong-base", "FAILED_PRECONDITION"),
    ("not-sampled", "PERMISSION_DENIED"),
    ("too-large", "RESOURCE_EXHAUSTED"),
    ("no-examples", "INVALID_ARGUMENT"),
])
def test_a_bad_manifest_is_refused_before_any_byte(coord, case, code):
    data = adapters.to_bytes(tensors(1.0))
    name, key = "a", None
    overrides = {
        "other-client": {"client": "b"}, "other-federation": {"federation_id": "0" * 32},
        "other-run": {"run_id": "another-run"}, "wrong-round": {"round_": 2}, "wrong-base": {"base": "1" * 64},
        "too-large": {"size": (1 << 20) + 1}, "no-examples": {"num_examples": 0},
    }.get(case, {})
    if case == "bad-signature":
        key = pki.generate_key()
    if case == "not-sampled":
        name = "c"
    manifest = coord.manifest(name, data, **overrides)
    assert refused(lambda: coord.start(name, manifest, key=key)).code == code
    unchanged(coord)


def test_a_malformed_manifest_is_refused(coord):
    error = refused(lambda: coord.intake.start("a", coord.certs["a"], "{not json", b"sig"))
    assert error.code == "INVALID_ARGUMENT" and "malformed manifest" in error.message
    unchanged(coord)


def test_late_updates_are_refused_whether_or_not_the_driver_marked_them(coord):
    data = adapters.to_bytes(tensors(1.0))
    coord.clock.advance(101)  # past the deadline; the driver has not ticked
    assert refused(lambda: coord.start("a", coord.manifest("a", data))).code == "DEADLINE_EXCEEDED"
    coord.heartbeat("a", "b")
    coord.driver.tick()  # no quorum: both are marked late and the round is sampled again
    run = coord.run
    assert coord.state.round(run.run_id, 1).attempt == 2
    coord.state.mark_late(run.run_id, 1, ["a"])
    assert refused(lambda: coord.start("a", coord.manifest("a", data))).code == "DEADLINE_EXCEEDED"


def test_updates_are_refused_while_the_round_is_not_collecting(tmp_path):
    coord = InProcessCoordinator(tmp_path, RUN)
    coord.start_round_one()  # round 1 waits for live sites
    data = adapters.to_bytes(tensors(1.0))
    error = refused(lambda: coord.start("a", coord.manifest("a", data)))
    assert error.code == "FAILED_PRECONDITION" and "not collecting" in error.message


def test_only_the_chosen_site_sends_the_initial_adapter_and_only_once(tmp_path):
    coord = InProcessCoordinator(tmp_path, RUN)
    run = coord.driver.ensure_run()
    coord.state.claim_init(run.run_id, "a")
    data = adapters.to_bytes(tensors(0.0))
    assert refused(lambda: coord.start("b", coord.manifest("b", data, round_=0))).code == "FAILED_PRECONDITION"
    aux = adapters.to_bytes({**tensors(0.0), "fedvlm.aux/scaffold.dc/x": torch.zeros(1)})
    error = refused(lambda: coord.send("a", adapters.from_bytes(aux), round_=0))
    assert error.code == "INVALID_ARGUMENT" and "initial adapter must not carry" in error.message
    coord.send("a", tensors(0.0), round_=0)
    other = adapters.to_bytes(tensors(5.0))
    assert refused(lambda: coord.start("a", coord.manifest("a", other, round_=0))).code == "ALREADY_EXISTS"


def test_a_nonce_is_announced_once_and_an_announced_upload_resumes_from_its_durable_offset(coord):
    data = adapters.to_bytes(tensors(1.0))
    manifest = coord.manifest("a", data)
    ticket = coord.start("a", manifest)
    half = len(data) // 2
    assert coord.intake.receive("a", iter([(ticket.upload_id, 0, data[:half])])) == ("", half)
    again = coord.start("a", manifest)  # the same signed manifest: where to resume
    assert (again.upload_id, again.offset) == (ticket.upload_id, half)
    forged = coord.manifest("a", data, nonce=manifest.nonce, num_examples=99)
    assert refused(lambda: coord.start("a", forged)).code == "ALREADY_EXISTS"  # same nonce, other manifest
    error = refused(lambda: coord.intake.receive("a", iter([(ticket.upload_id, 0, data)])))
    assert error.code == "OUT_OF_RANGE"  # bytes before the durable offset are not taken again
    assert coord.state.upload(ticket.upload_id).received == half
    digest, received = coord.intake.receive("a", iter([(ticket.upload_id, half, data[half:])]))
    assert (digest, received) == (manifest.sha256, len(data))


@pytest.mark.parametrize("case", ["empty", "unknown-id", "other-site", "too-many-bytes", "id-changes"])
def test_malformed_streams_are_refused(coord, case):
    data = adapters.to_bytes(tensors(1.0))
    ticket = coord.start("a", coord.manifest("a", data))
    other = coord.start("b", coord.manifest("b", adapters.to_bytes(tensors(2.0))))
    site, frames, code = {
        "empty": ("a", [], "INVALID_ARGUMENT"),
        "unknown-id": ("a", [("0" * 32, 0, data)], "NOT_FOUND"),
        "other-site": ("b", [(ticket.upload_id, 0, data)], "NOT_FOUND"),
        "too-many-bytes": ("a", [(ticket.upload_id, 0, data + b"x")], "INVALID_ARGUMENT"),
        "id-changes": ("a", [(ticket.upload_id, 0, data[:8]), (other.upload_id, 8, data[8:])], "INVALID_ARGUMENT"),
    }[case]
    assert refused(lambda: coord.intake.receive(site, iter(frames))).code == code
    assert coord.state.accepted_updates(coord.run.run_id, 1) == []
    assert coord.state.upload(ticket.upload_id) is not None  # still resumable


@pytest.mark.parametrize(("case", "message"), [
    ("digest", "digest mismatch"),
    ("schema", "adapter schema mismatch"),
    ("non-finite", "NaN or Inf"),
    ("unexpected-aux", "auxiliary tensors"),
])
def test_a_complete_upload_that_fails_verification_is_discarded(coord, case, message):
    good = tensors(1.0)
    values = {
        "schema": {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.ones(3, 2)},
        "non-finite": {**good, "layer.lora_A.weight": torch.full((2, 3), float("nan"))},
        "unexpected-aux": {**good, "fedvlm.aux/scaffold.dc/layer.lora_A.weight": torch.ones(2, 3)},
    }.get(case, good)
    data = adapters.to_bytes(values)
    manifest = coord.manifest("a", data, **({"sha256": "2" * 64} if case == "digest" else {}))
    ticket = coord.start("a", manifest)
    error = refused(lambda: coord.intake.receive("a", iter([(ticket.upload_id, 0, data)])))
    assert error.code == "INVALID_ARGUMENT" and message in error.message
    unchanged(coord)
    assert not coord.state.nonce_used(manifest.nonce)


def test_the_round_deadline_passing_during_an_upload_refuses_it_at_the_end(coord):
    data = adapters.to_bytes(tensors(1.0))
    ticket = coord.start("a", coord.manifest("a", data))
    coord.clock.advance(101)
    error = refused(lambda: coord.intake.receive("a", iter([(ticket.upload_id, 0, data)])))
    assert error.code == "DEADLINE_EXCEEDED"
    unchanged(coord)


def test_updates_of_one_round_must_carry_the_same_tensors(coord):
    coord.send("a", {"layer.lora_A.weight": torch.ones(2, 3)})  # a subset of the global's tensors is fine...
    data = adapters.to_bytes({"layer.lora_B.weight": torch.ones(3, 2)})
    ticket = coord.start("b", coord.manifest("b", data))
    error = refused(lambda: coord.intake.receive("b", iter([(ticket.upload_id, 0, data)])))
    assert error.code == "INVALID_ARGUMENT"  # ...but not another subset than the round's first update


def test_scaffold_updates_must_carry_exactly_the_expected_aux_tensors(tmp_path):
    scaffold = TaskSpec.from_dict({"algorithm": {"name": "scaffold"}})
    coord = InProcessCoordinator(tmp_path, RUN, scaffold, names=("a", "b"))  # both are sampled
    coord.open_round_one()
    good = tensors(1.0)
    dc = {f"fedvlm.aux/scaffold.dc/{n}": torch.zeros_like(t) for n, t in good.items()}
    data = adapters.to_bytes(good)  # no dc tensors
    ticket = coord.start("a", coord.manifest("a", data))
    error = refused(lambda: coord.intake.receive("a", iter([(ticket.upload_id, 0, data)])))
    assert error.code == "INVALID_ARGUMENT" and "auxiliary tensors" in error.message
    coord.send("a", {**good, **dc})
    assert [u.client for u in coord.state.accepted_updates(coord.run.run_id, 1)] == ["a"]
