"""Runs as a lifecycle and a status that tells the truth in every phase, in process: the real RoundDriver and Intake on
an in-memory state, the status document `fedvlm-coord status` prints, and what an edited federation.toml does
(tests/test_operator.py drives the same through a real daemon and the CLI)."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from fedvlm.coordinator.config import FederationConfig, RunConfig
from fedvlm.coordinator.layout import FederationDir
from fedvlm.coordinator.runs import (
    ConfigConflict,
    check_serve_config,
    config_changes,
    config_notice,
    find_run,
    new_run,
)
from fedvlm.coordinator.state import Activity, MetricsKind, RunState, TransitionRefused
from fedvlm.coordinator.status import document, local_document, snapshot
from fedvlm.spec import TaskSpec
from fedvlm.status_view import change_key, rounds_table, summary_line, view
from fedvlm.wire.v1 import admin_pb2

from .inprocess import InProcessCoordinator, tensors

ONE_ROUND = RunConfig(rounds=1, min_clients=3, clients_per_round=3, quorum=3, round_deadline=100.0, final_eval=True)


def finish_round(coord: InProcessCoordinator, value: float = 1.0) -> None:
    for offset, name in enumerate(sorted(coord.state.assignments(coord.run.run_id, coord.run.round))):
        coord.send(name, tensors(value + offset))
    coord.driver.tick()


def status(coord: InProcessCoordinator) -> dict:
    return local_document(coord.state)


def site(doc: dict, name: str) -> dict:
    return next(c for c in doc["clients"] if c["name"] == name)


def test_a_second_run_starts_only_after_the_first_is_over_and_the_first_stays_readable(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    first = coord.run
    with pytest.raises(TransitionRefused, match=r"run 1 \(\w+\) is running: stop it first"):
        new_run(coord.state, FederationConfig(run=ONE_ROUND))
    finish_round(coord)
    assert coord.run.state is RunState.EVALUATING
    stopped = coord.state.stop_run(first.run_id, "enough")
    assert (stopped.state, stopped.stop_reason, stopped.finished_at) == (RunState.STOPPED, "enough", coord.clock())
    with pytest.raises(TransitionRefused, match="already stopped"):
        coord.state.stop_run(first.run_id, "again")
    second_config = FederationConfig(run=RunConfig(rounds=2, min_clients=2, clients_per_round=2, quorum=2),
                                     task=TaskSpec.from_dict({"strategy": "F-L"}))
    second = new_run(coord.state, second_config, "run.toml")
    assert (second.number, second.state, second.config.rounds, second.task.strategy, second.config_source) == \
        (2, RunState.INIT, 2, "F-L", "run.toml")
    assert coord.run.run_id == second.run_id and [r.number for r in coord.state.runs()] == [1, 2]
    # The enrolled sites (no new token) take part: one of them is asked for the new run's initial adapter.
    coord.heartbeat()
    assert coord.state.claim_init(second.run_id, "b").init_client == "b"
    coord.send("b", tensors(0.0), round_=0)
    coord.driver.tick()
    assert coord.run.state is RunState.RUNNING and coord.run.round == 1
    # The first run's globals, metrics and audit entries are still there, by number or id.
    assert find_run(coord.state, "1").run_id == first.run_id == find_run(coord.state, first.run_id[:6]).run_id
    old = local_document(coord.state, run=find_run(coord.state, "1"))
    assert (old["run_number"], old["run_state"], old["stop_reason"]) == (1, "stopped", "enough")
    assert [r["round"] for r in old["rounds"]] == [0, 1]
    kinds = [e.entry["kind"] for e in coord.state.audit_entries()]
    assert kinds.count("run") == 2 and "run_stopped" in kinds
    runs = status(coord)["runs"]
    assert [(r["number"], r["state"], r["rounds_done"], r["strategy"]) for r in runs] == \
        [(1, "stopped", 1, "F-CL"), (2, "running", 0, "F-L")]
    assert find_run(coord.state, "3") is None and find_run(coord.state, "zzz") is None
    assert find_run(coord.state, first.run_id[:3]) is None  # too short to be an id prefix


def test_a_stopped_run_takes_no_more_updates_and_the_driver_leaves_it_alone(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    coord.state.stop_run(coord.run.run_id, "operator")
    coord.driver.tick()
    assert coord.run.state is RunState.STOPPED
    from fedvlm.coordinator.errors import Refused

    with pytest.raises(Refused, match="the run is stopped"):
        coord.send("a", tensors(1.0))


def test_status_tells_round_and_phase_in_every_phase_of_a_run(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.driver.ensure_run()
    seen = []

    def record() -> None:
        doc = status(coord)
        seen.append((doc["run_state"], doc["phase"], doc["round"], doc["total_rounds"]))

    record()
    coord.open_round_one()
    record()
    finish_round(coord)
    record()
    for name in ("a", "b", "c"):
        coord.state.record_metrics(coord.run.run_id, 1, name, MetricsKind.EVAL, "d", {"accuracy": 1.0})
    doc = status(coord)
    assert (doc["accepted"], doc["sampled"]) == (3, 3)  # final-evaluation reports
    coord.driver.tick()
    record()
    assert seen == [("init", "init", 0, 1), ("running", "training", 1, 1), ("evaluating", "final evaluation", 1, 1),
                    ("done", "done", 1, 1)]
    assert "finished after round 1 of 1" in summary_line(status(coord))


def test_finished_and_failed_sites_stay_so_and_a_new_run_shows_absent_ones_offline(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    run = coord.run
    coord.state.record_heartbeat("a", Activity.DONE, "run finished", 0, 0, run.run_id)
    coord.state.record_failure("b", "cannot train this run here: out of memory", run.run_id)
    coord.state.record_heartbeat("c", Activity.TRAINING, "round 1", 0, 0, run.run_id, step=3, steps_total=9)
    doc = status(coord)
    assert (site(doc, "c")["state"], site(doc, "c")["step"], site(doc, "c")["steps_total"]) == ("training", 3, 9)
    coord.clock.advance(run.config.heartbeat_timeout + 1)  # nobody polls any more
    doc = status(coord)
    assert [site(doc, n)["state"] for n in "abc"] == ["done", "failed", "offline"]
    assert site(doc, "b")["detail"] == "cannot train this run here: out of memory"
    assert site(doc, "c")["steps_total"] == 0  # progress only while training
    coord.state.stop_run(run.run_id, "x")
    new_run(coord.state, FederationConfig(run=ONE_ROUND))
    doc = status(coord)
    assert [site(doc, n)["state"] for n in "abc"] == ["offline", "failed", "offline"]  # done with the old run


def test_sites_training_seconds_and_steps_come_from_their_latest_train_report(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    run = coord.run
    coord.state.record_metrics(run.run_id, 1, "a", MetricsKind.TRAIN, "", {"seconds": 12.5, "steps": 40.0})
    doc = status(coord)
    assert (site(doc, "a")["train_seconds"], site(doc, "a")["train_steps"], site(doc, "a")["train_round"]) == \
        (12.5, 40, 1)
    assert site(doc, "b")["train_round"] == 0
    assert "12.5s, 40 steps (round 1)" in _text(view(doc))


def test_each_rounds_row_lists_every_sites_training_seconds_and_steps_of_that_round(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    run = coord.run
    for seconds, name in ((3.0, "c"), (1.5, "a"), (2.0, "b")):
        coord.state.record_metrics(run.run_id, 1, name, MetricsKind.TRAIN, "", {"seconds": seconds, "steps": 7.0})
    coord.state.record_metrics(run.run_id, 1, "a", MetricsKind.TRAIN, "", {"seconds": 4.0, "steps": 9.0})  # retrained
    finish_round(coord)
    rows = {r["round"]: r for r in status(coord)["rounds"]}
    assert rows[0]["training"] == []
    assert rows[1]["training"] == [{"client": "a", "seconds": 4.0, "steps": 9},
                                   {"client": "b", "seconds": 2.0, "steps": 7},
                                   {"client": "c", "seconds": 3.0, "steps": 7}]


def test_each_rounds_row_gives_the_size_of_its_stored_global(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    finish_round(coord)
    rows = status(coord)["rounds"]
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert row["global_bytes"] == coord.blobs.path(row["global_digest"]).stat().st_size > 0
    table = _text(rounds_table(status(coord)))
    assert "global size" in table and f"{rows[1]['global_bytes'] / 1024:.1f} KiB" in table
    assert "KiB" not in _text(rounds_table({"rounds": [{**rows[1], "global_bytes": 0}]}))  # an older coordinator


def _text(renderable) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(renderable)
    return console.export_text()


def test_the_status_document_is_the_same_through_the_admin_message(tmp_path):
    """What the Admin RPC sends (a FederationStatus) reads back as exactly the local document: ints stay ints,
    every field is present even before the first global."""
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.driver.ensure_run()
    for step in ("init", "round"):
        if step == "round":
            coord.open_round_one()
            coord.state.record_heartbeat("a", Activity.UPLOADING, "", 5, 3_000_000_000)
        raw = snapshot(coord.state, live=True)
        wire = admin_pb2.FederationStatus.FromString(
            json_format.ParseDict(raw, admin_pb2.FederationStatus()).SerializeToString())
        assert document(wire) == document(raw)
        doc = document(raw)
        assert isinstance(site(doc, "a")["bytes_total"], int) and doc["phase"]
        assert set(doc) == {f.name for f in admin_pb2.FederationStatus.DESCRIPTOR.fields}
    assert site(doc, "a")["bytes_total"] == 3_000_000_000


def test_watch_reports_a_change_but_not_the_clock_moving(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    before = status(coord)
    coord.clock.advance(1)
    coord.heartbeat()
    assert change_key(status(coord)) == change_key(before)
    coord.send("a", tensors(1.0))
    after = status(coord)
    assert change_key(after) != change_key(before)
    assert "updates 1/3" in summary_line(after) and "\n" not in summary_line(after)


FED_TOML = """
name = "x"
[run]
rounds = 2
min_clients = 1
clients_per_round = 1
quorum = 1
"""


def test_an_edited_federation_toml_is_refused_under_an_active_run_and_named_after_it(tmp_path):
    fed = FederationDir(tmp_path)
    fed.config.write_text(FED_TOML)
    coord = InProcessCoordinator(tmp_path, FederationConfig.load(fed.config).run)
    coord.driver.ensure_run()
    assert config_notice(fed, coord.run) == ""
    check_serve_config(fed, coord.state)  # unchanged: serves
    fed.config.write_text(FED_TOML.replace("rounds = 2", "rounds = 5") + '[task]\nstrategy = "F-L"\n')
    assert config_changes(coord.run, FederationConfig.load(fed.config)) == \
        ["run.rounds: 2 -> 5", "task.strategy: F-CL -> F-L"]
    with pytest.raises(ConfigConflict, match=r"run.rounds: 2 -> 5; task.strategy: F-CL -> F-L\. Not applied"):
        check_serve_config(fed, coord.state)
    assert "run.rounds: 2 -> 5" in local_document(coord.state, fed)["config_notice"]
    fed.config.write_text("[run]\nrounds = 0\n")
    assert "it does not load (" in config_notice(fed, coord.run) and "run.rounds" in config_notice(fed, coord.run)
    coord.state.stop_run(coord.run.run_id, "x")
    check_serve_config(fed, coord.state)  # nothing active: serves, and status says how to apply the file
    fed.config.write_text(FED_TOML.replace("rounds = 2", "rounds = 5"))
    assert config_notice(fed, coord.run).endswith("`fedvlm-coord run new` starts a run from it")
    other = new_run(coord.state, FederationConfig(run=RunConfig(rounds=7, min_clients=1, clients_per_round=1,
                                                                quorum=1)), str(tmp_path / "run.toml"))
    assert config_notice(fed, other) == ""  # a run from another file: federation.toml is only the next default
    check_serve_config(fed, coord.state)
    assert json.loads(json.dumps(local_document(coord.state, fed)))["config_notice"] == ""


def test_operator_and_site_chosen_strings_are_shown_as_text_not_markup(tmp_path):
    coord = InProcessCoordinator(tmp_path, ONE_ROUND)
    coord.open_round_one()
    coord.state.record_failure("a", "bad [/bold] record [red]x", coord.run.run_id)
    coord.state.stop_run(coord.run.run_id, "[/] operator [bold]")
    text = _text(view(status(coord)))
    assert "[/] operator [bold]" in text and "bad [/bold] record" in text
