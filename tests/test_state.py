"""The state layer itself: schema versions, enrollment and revocation, heartbeats, metrics and the audit chain, on
an in-memory state and on real files (the round transitions are in test_round_driver.py and test_intake.py)."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from fedvlm.coordinator.cli import app as coord_app
from fedvlm.coordinator.config import RunConfig
from fedvlm.coordinator.layout import FederationDir
from fedvlm.coordinator.state import (
    CONFIG_FROM_FEDERATION_TOML,
    GENESIS,
    SCHEMA_VERSION,
    Activity,
    AssignmentState,
    MetricsKind,
    RunState,
    State,
    StateError,
    TransitionRefused,
    audit_hash,
)
from fedvlm.coordinator.state.db import SCHEMA, UPGRADES
from fedvlm.security import pki
from fedvlm.spec import TaskSpec

from .inprocess import Clock, InProcessCoordinator

# The task JSON a coordinator stored before algorithms had their own configs: every algorithm's keys in one table.
OLD_TASK_JSON = (
    '{"algorithm": {"aggregator": "mean", "beta1": 0.9, "beta2": 0.99, "clip_norm": 0.0, "dp_delta": 1e-05, '
    '"dp_noise_multiplier": 0.0, "eta": 0.001, "krum_byzantine": 1, "krum_select": 1, "lora_exact": false, '
    '"mu": 0.1, "name": "fedprox", "scaffold_clients": 0, "server_lr": 1.0, "server_momentum": 0.9, "tau": 0.001, '
    '"trim_ratio": 0.2}, "box_format": "xyxy-pixel", "lora": {"alpha": 32, "dropout": 0.05, "r": 8, '
    '"targets": ["all-linear"]}, "model": "tiny-llava", "seed": 0, "strategy": "F-CL", "switch_round": 0, '
    '"task_type": "classification", "train": {"batch_size": 8, "eval_batch_size": 32, "local_epochs": 1.0, '
    '"lr": 0.001, "max_new_tokens": 4, "max_steps": 0, "weight_decay": 0.0}}'
)


def test_a_new_state_records_the_current_schema_version(tmp_path):
    state = State(tmp_path / "state.db")
    assert SCHEMA_VERSION == 3 and state.schema_version() == 3
    state.close()
    assert State(tmp_path / "state.db", readonly=True).schema_version() == 3


def _version_1_database(path, user_version: int) -> None:
    """A state.db as fedvlm wrote it before runs were a lifecycle: version-1 tables, a run, a heartbeat."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO meta(key, value) VALUES ('federation_id', 'old')")
    db.execute("INSERT INTO runs(run_id, config_json, task_json, state, round, created_at) VALUES (?,?,?,?,?,?)",
               ("r1", '{"rounds": 2}', TaskSpec().to_json(), "running", 2, 100.0))
    db.execute("INSERT INTO clients(name, cert_fingerprint, enrolled_at, state, detail, last_seen) "
               "VALUES ('a', 'fp', 1.0, 'training', 'round 2: step 3/9', 50.0)")
    db.execute(f"PRAGMA user_version={user_version}")
    db.commit()
    db.close()


@pytest.mark.parametrize("user_version", [0, 1])
@pytest.mark.parametrize("readonly", [False, True])
def test_an_older_state_is_upgraded_in_place_and_keeps_its_runs_and_sites(tmp_path, user_version, readonly):
    _version_1_database(tmp_path / "state.db", user_version)
    state = State(tmp_path / "state.db", readonly=readonly)  # a read-only command upgrades it too
    assert state.schema_version() == 3 and state.federation_id() == "old"
    run = state.current_run()
    assert (run.run_id, run.state, run.round, run.number, run.config.rounds) == ("r1", RunState.RUNNING, 2, 1, 2)
    assert run.stop_reason is None and run.config_source == CONFIG_FROM_FEDERATION_TOML
    client = state.client("a")
    assert (client.activity, client.detail, client.run_id, client.step, client.steps_total) == \
        (Activity.TRAINING, "round 2: step 3/9", None, 0, 0)
    state.close()
    writable = State(tmp_path / "state.db")  # the upgraded tables take the new transitions
    writable.stop_run("r1", "operator")
    writable.record_heartbeat("a", Activity.TRAINING, "", 0, 0, run_id="r1", step=4, steps_total=9)
    assert writable.current_run().state is RunState.STOPPED and writable.client("a").step == 4


@pytest.mark.parametrize("readonly", [False, True])
def test_a_state_from_a_newer_version_is_refused_and_left_alone(tmp_path, readonly):
    state = State(tmp_path / "state.db")
    state.init_federation("f" * 32, "ca")
    state.close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA user_version=4")
    db.close()
    with pytest.raises(StateError, match=r"state schema version 4 is newer than this fedvlm's \(3\)"):
        State(tmp_path / "state.db", readonly=readonly)
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 4
    assert db.execute("SELECT value FROM meta").fetchall() == [("f" * 32,)]


def test_the_cli_refuses_a_newer_state_directory_with_one_line(tmp_path):
    root = tmp_path / "fed"
    result = CliRunner().invoke(coord_app, ["init", "--dir", str(root), "--host", "localhost"])
    assert result.exit_code == 0, result.output
    db = sqlite3.connect(FederationDir(root).database)
    db.execute("PRAGMA user_version=7")
    db.close()
    for args in (["status"], ["serve", "--listen", "127.0.0.1:0", "--enroll-listen", "127.0.0.1:0"],
                 ["enroll", "site-a"]):
        result = CliRunner().invoke(coord_app, [*args, "--dir", str(root)])
        assert result.exit_code == 1, (args, result.output)
        text = " ".join(result.output.split())  # rich wraps long lines at the terminal's width
        assert text.startswith("error:") and text.count("error:") == 1, (args, result.output)
        assert "state schema version 7 is newer than this fedvlm's (3)" in text and "Traceback" not in text


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    (tmp_path / "state.db").write_bytes(b"not sqlite at all, just some bytes " * 100)
    with pytest.raises(StateError, match="not a readable fedvlm state database"):
        State(tmp_path / "state.db")


def test_a_token_enrolls_its_site_once_and_revocation_sticks():
    clock = Clock()
    state = State.in_memory(clock)
    state.issue_token("t1", "site-a", b"proof", clock() + 60)
    assert state.token("t1").used_at is None
    assert state.enroll_client("t1", "site-a", "fp1")
    assert not state.enroll_client("t1", "site-a", "fp2")  # used: nothing changes
    client = state.client("site-a")
    assert (client.cert_fingerprint, client.revoked, client.activity) == ("fp1", False, Activity.IDLE)
    assert state.token("t1").used_at == clock()
    state.issue_token("t2", "site-a", b"proof", clock() + 60)
    assert state.enroll_client("t2", "site-a", "fp3")  # re-enrollment replaces the certificate
    assert state.client("site-a").cert_fingerprint == "fp3"
    assert state.revoke_client("site-a") and not state.revoke_client("nobody")
    assert state.client("site-a").revoked and state.live_clients(60) == []


def test_heartbeats_decide_who_is_live():
    clock = Clock()
    state = State.in_memory(clock)
    for name in ("a", "b"):
        state.issue_token(name, name, b"", clock() + 60)
        state.enroll_client(name, name, name)
    assert state.live_clients(10) == []  # enrolled but never seen
    state.record_heartbeat("a", Activity.TRAINING, "step 3/9", 0, 0)
    clock.advance(5)
    state.record_heartbeat("b", Activity.UPLOADING, "", 10, 40)
    assert state.live_clients(10) == ["a", "b"]
    clock.advance(6)
    assert state.live_clients(10) == ["b"]
    b = state.client("b")
    assert (b.activity, b.bytes_done, b.bytes_total, b.last_seen) == (Activity.UPLOADING, 10, 40, clock() - 6)


def test_a_metrics_report_replaces_the_earlier_one_and_becomes_the_last_metrics():
    state = State.in_memory()
    state.issue_token("a", "a", b"", 1e12)
    state.enroll_client("a", "a", "a")
    state.record_metrics("run", 1, "a", MetricsKind.EVAL, "d" * 64, {"accuracy": 0.5})
    state.record_metrics("run", 1, "a", MetricsKind.EVAL, "d" * 64, {"accuracy": 0.75})
    state.record_metrics("run", 1, "a", MetricsKind.TRAIN, "d" * 64, {"loss": 1.0})
    [report] = state.metrics("run", MetricsKind.EVAL)
    assert (report.round, report.client, report.metrics) == (1, "a", {"accuracy": 0.75})
    assert state.metrics("run", MetricsKind.EVAL, 2) == []
    assert state.client("a").last_metrics == {"loss": 1.0}


def test_audited_transitions_form_one_hash_chain():
    state = State.in_memory()
    state.init_federation("f" * 32, "ca-fingerprint")
    state.issue_token("t", "a", b"", 1e12)
    state.enroll_client("t", "a", "fp")
    state.revoke_client("a")
    entries = state.audit_entries()
    assert [e.entry["kind"] for e in entries] == ["init", "token", "enroll", "revoke"]
    prev = GENESIS
    for entry in entries:
        assert entry.prev_hash == prev and entry.hash == audit_hash(prev, entry.entry_json)
        prev = entry.hash
    assert state.audit_head() == prev


def test_a_restarted_coordinator_reads_the_runs_it_stored_in_either_task_json_shape(tmp_path):
    state = State(tmp_path / "state.db")
    spec = TaskSpec.from_dict({"algorithm": {"name": "fedprox", "mu": 0.1}})
    state.create_run("new", RunConfig(rounds=2), spec)
    state.close()
    reopened = State(tmp_path / "state.db")
    run = reopened.current_run()
    assert run.task == spec and run.config == RunConfig(rounds=2) and run.task_json == spec.to_json()
    reopened.close()
    db = sqlite3.connect(tmp_path / "state.db")  # as the previous version of fedvlm wrote it
    db.execute("UPDATE runs SET task_json=?", (OLD_TASK_JSON,))
    db.commit()
    db.close()
    assert State(tmp_path / "state.db", readonly=True).current_run().task == spec


def test_a_version_2_state_is_upgraded_to_3_with_the_secure_aggregation_tables(tmp_path):
    _version_1_database(tmp_path / "state.db", 1)
    db = sqlite3.connect(tmp_path / "state.db")
    for statement in filter(str.strip, UPGRADES[2].split(";")):
        db.execute(statement)
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    state = State(tmp_path / "state.db")
    assert state.schema_version() == 3 and state.current_run().run_id == "r1"
    state.open_secagg("r1", 2, 1, 2, 60.0)
    state.record_secagg_keys("r1", 2, 1, "a", "{}", b"sig", b"pem")
    assert [k.client for k in state.secagg_keys("r1", 2, 1)] == ["a"]
    with pytest.raises(TransitionRefused, match="not in secure-aggregation phase shares"):
        state.record_secagg_shares("r1", 2, 1, "a", {"a": b"x"})


def test_a_poll_records_the_heartbeat_only_for_the_enrolled_unrevoked_certificate():
    clock = Clock()
    state = State.in_memory(clock)
    state.issue_token("a", "a", b"", clock() + 60)
    state.enroll_client("a", "a", "fp-a")
    assert state.poll("a", "fp-other", Activity.TRAINING, "x", 0, 0).cert_fingerprint == "fp-a"
    assert state.poll("nobody", "fp-a", Activity.TRAINING, "x", 0, 0).cert_fingerprint is None
    assert state.client("a").last_seen is None  # a refused heartbeat changed nothing
    assert state.poll("a", "fp-a", Activity.TRAINING, "x", 0, 0).revoked is False
    assert state.client("a").last_seen == clock()
    state.revoke_client("a")
    clock.advance(5)
    assert state.poll("a", "fp-a", Activity.IDLE, "", 0, 0).revoked is True
    assert state.client("a").last_seen == clock() - 5


def test_the_poll_view_is_what_the_separate_reads_return(tmp_path):
    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=1, min_clients=3, clients_per_round=2, quorum=1,
                                                     round_deadline=100.0, final_eval=False))
    state = coord.state
    empty = state.poll_view("a")
    assert (empty.run, empty.round, empty.assignment, empty.base_global) == (None, None, None, None)
    assert empty.cert_fingerprint == pki.fingerprint(coord.certs["a"]) and not empty.revoked
    coord.open_round_one()
    run = state.current_run()
    views = {name: state.poll_view(name) for name in "abc"}
    for name, view in views.items():
        assert view.run == run and view.round == state.round(run.run_id, 1)
        assert view.assignment == state.assignment(run.run_id, 1, name)
        assert view.base_global == state.global_by_digest(view.round.base_digest) == state.global_version(run.run_id, 0)
    assert sorted(v.assignment for v in views.values() if v.assignment) == [AssignmentState.ASSIGNED] * 2
    assert [v.assignment for v in views.values()].count(None) == 1  # the site not sampled
    nobody = state.poll_view("nobody")
    assert nobody.cert_fingerprint is None and nobody.run == run and nobody.assignment is None


def test_reads_on_other_threads_do_not_wait_for_a_transition_in_progress(tmp_path):
    import threading

    state = State(tmp_path / "state.db")
    state.issue_token("a", "a", b"", 1e12)
    state.enroll_client("a", "a", "fp-a")
    inside, release, seen = threading.Event(), threading.Event(), []

    def slow_transition():
        with state._tx() as db:  # a transition that holds the writer (and its lock) until released
            db.execute("UPDATE clients SET detail='uncommitted' WHERE name='a'")
            inside.set()
            release.wait()

    writer = threading.Thread(target=slow_transition)
    writer.start()
    inside.wait()
    reader = threading.Thread(target=lambda: seen.append(state.client("a").detail))
    reader.start()
    reader.join(timeout=30)
    answered_while_held = not reader.is_alive()
    release.set()
    writer.join()
    reader.join()
    state.close()
    assert answered_while_held and seen == [""]  # the committed state, not the transition's uncommitted write


def test_a_heartbeat_is_accepted_while_a_transition_holds_the_writer_and_written_in_the_next_batch(tmp_path):
    import threading

    state = State(tmp_path / "state.db")
    state.issue_token("a", "a", b"", 1e12)
    state.enroll_client("a", "a", "fp-a")
    inside, release, accepted = threading.Event(), threading.Event(), []

    def slow_transition():
        with state._tx():  # e.g. an upload's fsync'd commit
            inside.set()
            release.wait()

    writer = threading.Thread(target=slow_transition)
    writer.start()
    inside.wait()
    poll = threading.Thread(target=lambda: accepted.append(
        state.poll("a", "fp-a", Activity.TRAINING, "step 1/9", 0, 0, "r1", 1, 9).cert_fingerprint))
    poll.start()
    poll.join(timeout=30)
    answered_while_held = not poll.is_alive()
    release.set()
    writer.join()
    poll.join()
    other = sqlite3.connect(tmp_path / "state.db")  # another process's view: state.db itself

    def on_disk():
        return other.execute("SELECT state, step FROM clients WHERE name='a'").fetchone()

    assert answered_while_held and accepted == ["fp-a"]
    assert (state.client("a").activity, state.client("a").step) == (Activity.TRAINING, 1)  # this process sees it
    assert on_disk() == ("idle", 0)  # not written yet
    assert state.flush_heartbeats() == 1 and state.flush_heartbeats() == 0
    assert on_disk() == ("training", 1)
    state.poll("a", "fp-a", Activity.UPLOADING, "", 5, 9, "r1")
    state.close()  # a clean stop writes what is pending
    assert on_disk() == ("uploading", 0)


def test_pending_heartbeats_are_written_before_a_revocation_and_never_for_a_replaced_certificate():
    clock = Clock()
    state = State.in_memory(clock)
    for name in "ab":
        state.issue_token(name, name, b"", clock() + 60)
        state.enroll_client(name, name, f"fp-{name}")
    state.poll("a", "fp-a", Activity.TRAINING, "", 0, 0)
    state.poll("b", "fp-b", Activity.TRAINING, "", 0, 0)
    state.revoke_client("a")  # accepted before the revocation: kept
    assert state.client("a").last_seen == clock() and state.live_clients(60) == ["b"]
    clock.advance(5)
    state.poll("b", "fp-b", Activity.IDLE, "", 0, 0)
    state.issue_token("b2", "b", b"", clock() + 60)
    state.enroll_client("b2", "b", "fp-b-new")  # re-enrolled: the old certificate's heartbeat was written first
    assert (state.client("b").activity, state.client("b").last_seen) == (Activity.IDLE, clock())
    clock.advance(5)
    state.poll("b", "fp-b", Activity.TRAINING, "", 0, 0)  # the old certificate: not recorded
    assert state.flush_heartbeats() == 0 and state.client("b").last_seen == clock() - 5


def test_each_read_of_a_run_carries_its_own_task_text_parsed_once(tmp_path):
    state = State(tmp_path / "state.db")
    first = TaskSpec.from_dict({"algorithm": {"name": "fedprox", "mu": 0.1}})
    state.create_run("one", RunConfig(rounds=2), first)
    assert state.current_run().task is state.current_run().task == first  # one parse serves every read
    state.stop_run("one", "replaced")
    second = TaskSpec.from_dict({"algorithm": {"name": "fedadam", "eta": 0.01}})
    state.create_run("two", RunConfig(rounds=2), second)
    assert state.current_run().task == second and state.run("one").task == first
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("UPDATE runs SET task_json=? WHERE run_id='two'", ('{"strategy": "nope"}',))
    db.commit()
    db.close()
    for _ in range(2):  # a text that does not parse is refused on every read, never remembered as a spec
        with pytest.raises(ValueError, match="strategy"):
            _ = state.current_run().task
    state.close()
