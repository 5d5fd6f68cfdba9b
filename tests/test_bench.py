"""`fedvlm bench`: config validation, a small resumable sweep with its report, the baselines, and the in-process
simulation against a real federation (coordinator + two fedvlm-client processes) for one round."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedvlm import adapters
from fedvlm.algorithms.base import split_aux
from fedvlm.cli import app
from fedvlm.data.digits import build_digits
from fedvlm.spec import SpecError
from fedvlm.study.config import BenchConfig, expand_grid, load_config
from fedvlm.study.sweep import run_study, trials_of
from fedvlm.vlm.presets import preset_dir

from .harness import Coordinator, shut_down, start_sites, wait_sites_ok

TASK = """
[task]
model = "tiny-llava"
strategy = "F-CL"
seed = 0
[task.train]
local_epochs = 0.1
batch_size = 8
lr = 0.001
max_steps = 2
"""

SWEEP = TASK + """
[experiment]
name = "small"
dataset = "digits"
num_clients = 2
rounds = 2
seeds = [0, 1]
train_size = 32
test_size = 8
[grid]
"experiment.partition" = ["iid", "dirichlet:0.5"]
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory, fedvlm_cache):
    preset_dir("tiny-llava", fedvlm_cache)
    return fedvlm_cache


def _raw(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize(("extra", "key"), [
    ('[experiment]\nnum_clientz = 2', "experiment.num_clientz"),
    ('[experiment]\nrounds = 0', "experiment.rounds"),
    ('[experiment]\nrounds = "2"', "experiment.rounds"),
    ('[experiment]\npartition = "dirichlet"', "experiment.partition"),
    ('[experiment]\nbaseline = "solo"', "experiment.baseline"),
    ('[experiment]\nnum_clients = 2\nclients_per_round = 3', "experiment.clients_per_round"),
    ('[experiment]\nseeds = [1, 1]', "experiment.seeds"),
    ('[task.algorithm]\nname = "fedsgd"', "task.algorithm.name"),
    ('lrate = 0.1', "task.train.lrate"),
])
def test_bad_config_keys_are_named(extra, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        BenchConfig.from_dict(_raw(TASK + extra))  # a bare key lands in [task.train], the last table of TASK


def test_bad_grid_keys_are_named(tmp_path):
    with pytest.raises(SpecError, match=r"grid\.task\.train\.lrate|task\.train\.lrate"):
        expand_grid(_raw(TASK + '[grid]\n"task.train.lrate" = [0.1, 0.2]'))
    with pytest.raises(SpecError, match=r"grid\.rounds"):
        expand_grid(_raw(TASK + '[grid]\n"rounds" = [1, 2]'))
    with pytest.raises(SpecError, match=r"grid\.experiment\.partition"):
        expand_grid(_raw(TASK + '[grid]\n"experiment.partition" = []'))
    path = tmp_path / "grid.toml"
    path.write_text(SWEEP)
    with pytest.raises(SpecError, match="grid"):
        load_config(path)  # a sweep file is not an experiment file
    result = CliRunner().invoke(app, ["bench", "run", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "grid" in result.output
    variants = expand_grid(_raw(SWEEP))
    assert [v.name for v in variants] == ["partition=iid", "partition=dirichlet-0.5"]
    assert len(trials_of(variants)) == 4


def test_help_names_the_config_tables():
    # rich reads "[task]" as markup and would drop it from the help text
    runner = CliRunner()
    sweep = " ".join(runner.invoke(app, ["bench", "sweep", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "[task], [experiment] and [grid]" in sweep and "fedvlm[ray]" in sweep
    run = " ".join(runner.invoke(app, ["bench", "run", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "[task] + [experiment]" in run


def test_baselines_list_adds_each_baseline_once_per_setting_it_depends_on():
    text = 'baselines = ["centralized", "local"]\n' + SWEEP + '"task.algorithm.name" = ["fedavg", "fedprox"]\n'
    names = [v.name for v in expand_grid(_raw(text))]
    assert names == [
        "partition=iid__name=fedavg", "partition=iid__name=fedprox", "partition=dirichlet-0.5__name=fedavg",
        "partition=dirichlet-0.5__name=fedprox",
        "baseline=centralized",  # the union of the clients' data: neither the split nor the algorithm matter
        "baseline=local__partition=iid", "baseline=local__partition=dirichlet-0.5"]
    variants = expand_grid(_raw(text))
    assert [v.config.experiment.baseline for v in variants].count("federated") == 4
    with pytest.raises(SpecError, match="baselines"):
        expand_grid(_raw(text.replace('["centralized", "local"]', '["solo"]')))
    with pytest.raises(SpecError, match="baselines"):
        expand_grid(_raw(text + '"experiment.baseline" = ["federated", "local"]\n'))


def test_suites_in_the_repo_are_valid():
    suites = sorted((Path(__file__).parents[1] / "studies").glob("*.toml"))
    assert len(suites) >= 4
    for suite in suites:
        variants = expand_grid(_raw(suite.read_text()))
        assert variants, suite
        assert "# Paper setting:" in suite.read_text(), suite


def test_small_sweep_report_and_resume(tmp_path, cache):
    grid = tmp_path / "grid.toml"
    grid.write_text(SWEEP)
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "sweep", str(grid), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 trial(s) run" in result.output
    report = (out / "report.md").read_text()
    assert "| variant | partition | baseline | seeds | accuracy | MB up | MB down | wall s |" in report
    assert "| partition=iid | iid | federated | 2/2 |" in report
    assert "| partition=dirichlet-0.5 | dirichlet:0.5 | federated | 2/2 |" in report
    assert "| all | federated | " in report and "Drop of the final metric from IID" in report  # one line: the splits
    assert "±" in report
    for png in ("rounds.png", "heterogeneity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    versions = json.loads((out / "versions.json").read_text())
    assert {"python", "torch", "transformers", "peft", "fedvlm"} <= set(versions)
    trial = out / "trials" / "partition=iid" / "seed-1"
    rounds = [json.loads(x) for x in (trial / "rounds.jsonl").read_text().splitlines()]
    clients = [json.loads(x) for x in (trial / "clients.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and "accuracy" in rounds[-1]["metrics"]
    assert len(clients) == 4 and all(c["bytes_up"] > 0 and c["bytes_down"] > 0 for c in clients)
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["bytes_up"] == sum(c["bytes_up"] for c in clients) and summary["wall_seconds"] > 0
    assert json.loads((trial / "config.json").read_text())["task"]["seed"] == 1

    # Resume: nothing is re-run; a trial without its DONE marker is redone, alone.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/*/summary.json")}
    assert len(stamps) == 4
    (out / "trials" / "partition=dirichlet-0.5" / "seed-0" / "DONE").unlink()
    result = runner.invoke(app, ["bench", "sweep", str(grid), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 trial(s) run" in result.output
    changed = [p for p, t in stamps.items() if p.stat().st_mtime_ns != t]
    assert changed == [out / "trials" / "partition=dirichlet-0.5" / "seed-0" / "summary.json"]
    assert run_study(expand_grid(_raw(SWEEP)), out) == []
    # An edited grid file: new variants run, unchanged ones stay; a changed config re-runs its trials.
    edited = SWEEP.replace('["iid", "dirichlet:0.5"]', '["iid", "dirichlet:0.3"]')
    assert sorted(run_study(expand_grid(_raw(edited)), out)) == ["partition=dirichlet-0.3/seed-0",
                                                                 "partition=dirichlet-0.3/seed-1"]
    edited = edited.replace("lr = 0.001", "lr = 0.002")
    assert len(run_study(expand_grid(_raw(edited)), out)) == 4
    assert run_study(expand_grid(_raw(edited)), out) == []
    result = runner.invoke(app, ["bench", "report", str(out)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("baseline", ["centralized", "local"])
def test_baselines(tmp_path, cache, baseline):
    text = SWEEP.split("[grid]")[0].replace("seeds = [0, 1]", "seeds = [0]").replace("rounds = 2", "rounds = 1")
    variants = expand_grid(_raw(text + f'baseline = "{baseline}"\n'))
    assert run_study(variants, tmp_path) == ["small/seed-0"]
    trial = tmp_path / "trials" / "small" / "seed-0"
    clients = [json.loads(x) for x in (trial / "clients.jsonl").read_text().splitlines()]
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["bytes_up"] == 0 and summary["bytes_down"] == 0
    assert "accuracy" in summary["final_metrics"]
    if baseline == "centralized":
        assert [c["client"] for c in clients] == ["union"] and clients[0]["num_examples"] == 32
    else:
        assert [c["client"] for c in clients] == ["site-1", "site-2"]
        assert sum(c["num_examples"] for c in clients) == 32


def test_stragglers_miss_the_round_deadline(tmp_path, cache):
    """Half the clients are 10x slower; a deadline between their times refuses their updates (no bytes up) and
    closes every round at the deadline; with a quorum the fast half cannot meet, no round aggregates."""
    text = SWEEP.split("[grid]")[0].replace("seeds = [0, 1]", "seeds = [3]").replace("num_clients = 2",
                                                                                      "num_clients = 4")
    text += "stragglers = 0.5\nstraggler_slowdown = 10.0\nstep_seconds = 1\nround_deadline = 5\ntarget = 0.01\n"
    out = tmp_path / "deadline"
    run_study(expand_grid(_raw(text)), out)
    trial = out / "trials" / "small" / "seed-3"
    rounds = [json.loads(x) for x in (trial / "rounds.jsonl").read_text().splitlines()]
    clients = [json.loads(x) for x in (trial / "clients.jsonl").read_text().splitlines()]
    assert all(c["steps"] in (1, 2) for c in clients)  # a normal client takes at most 2 s, a straggler 10+ s
    late = sorted({c["client"] for c in clients if c.get("late")})
    assert len(late) == 2 and all(sorted(r["late"]) == late and r["aggregated"] for r in rounds)
    assert [r["sim_clock"] for r in rounds] == [5.0, 10.0]
    assert all(c["bytes_up"] == 0 for c in clients if c.get("late"))
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["bytes_up"] == sum(c["bytes_up"] for c in clients) == 2 * 2 * clients[0]["bytes_down"]
    from fedvlm.study.report import write_report

    report = write_report(out).read_text()
    assert "## Stragglers and the round deadline" in report and "| small | 0.5 | 5 | 2.00 ± 0.00 | 0.0 ± 0.0 |" \
        in report
    assert "## Cost to reach the target" in report and (out / "to_target.png").exists()

    lost = tmp_path / "lost"
    run_study(expand_grid(_raw(text.replace("round_deadline = 5", "round_deadline = 5\nquorum = 3"))), lost)
    rounds = [json.loads(x) for x in (lost / "trials/small/seed-3/rounds.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rounds] == [False, False]
    first = adapters.from_bytes((lost / "trials/small/seed-3/global.safetensors").read_bytes())
    fresh = _fresh_global(_raw(text), lost, cache)
    assert first.keys() == fresh.keys() and all(torch.equal(first[k], fresh[k]) for k in fresh)


def test_a_privacy_budget_ends_a_trial_where_the_coordinator_would_stop_the_run(tmp_path, cache):
    """sigma 2 with every site in every round spends epsilon 4.73 in round 1 and 7.08 after round 2: a budget of 5
    lets one of three rounds run, and the trial's final metrics are global 1's (scored though eval_every skips it)."""
    text = SWEEP.split("[grid]")[0].replace("seeds = [0, 1]", "seeds = [0]").replace("rounds = 2", "rounds = 3")
    text = text.replace("[experiment]", "[task.algorithm]\nclip_norm = 1.0\ndp_noise_multiplier = 2.0\n"
                                        "dp_max_epsilon = 5.0\n[experiment]") + "eval_every = 3\n"
    run_study(expand_grid(_raw(text)), tmp_path)
    trial = tmp_path / "trials" / "small" / "seed-0"
    rounds = [json.loads(x) for x in (trial / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["server_metrics"]["dp_epsilon"] == pytest.approx(4.7285, abs=1e-3)
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["stop_reason"].startswith("privacy budget reached after round 1: round 2 would spend epsilon 7.08")
    assert "accuracy" in summary["final_metrics"]
    from fedvlm.study.report import write_report

    assert "- small seed 0: privacy budget reached after round 1" in write_report(tmp_path).read_text()


def _fresh_global(raw: dict, out: Path, cache: Path) -> dict:
    """Global 0 of a trial with seed 3: what a run that never aggregates must end with."""
    from fedvlm.learner import Learner
    from fedvlm.study.data import prepare

    config = BenchConfig.from_dict(raw)
    data = prepare(config.experiment, 3, out / "data")
    return Learner(config.for_seed(3), data.sites[0], cache_dir=cache).adapter_state()


@pytest.mark.slow
def test_parallel_workers(tmp_path, cache):
    text = SWEEP.split("[grid]")[0].replace("rounds = 2", "rounds = 1")
    variants = expand_grid(_raw(text + '[grid]\n"task.algorithm.name" = ["fedavg", "fedavgm"]\n'))
    ran = run_study(variants, tmp_path, workers=2)
    assert sorted(ran) == sorted(t.id for t in trials_of(variants)) and len(ran) == 4
    assert len(list(tmp_path.glob("trials/*/*/DONE"))) == 4
    assert run_study(variants, tmp_path, workers=2) == []


FEDERATION = """
name = "bench-eq"
[run]
rounds = 1
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "60s"
final_eval = false
""" + TASK + """
[task.algorithm]
name = "fedprox"
mu = 0.1
"""


@pytest.mark.slow
def test_in_process_round_equals_the_real_federation(tmp_path, cache):
    """Same spec, same seed, same site files: the global after round 1 of the coordinator + 2 fedvlm-client
    processes equals the in-process simulation's."""
    layout = build_digits(tmp_path / "data", sites=2, seed=0)
    for path in [*(s / "test.json" for s in layout.site_dirs), tmp_path / "data" / "test.json"]:
        path.write_text(json.dumps(json.loads(path.read_text())[:8]))  # evaluation is not what is compared
    coord = Coordinator(tmp_path / "coord", FEDERATION)
    coord.start()
    clients = {}
    try:
        clients = start_sites(coord, layout.site_dirs, tmp_path, cache)
        wait_sites_ok(clients, tmp_path)
        digest = coord.query("SELECT digest FROM globals WHERE round=1")[0]["digest"]
        real, _ = split_aux(coord.blob(digest))
        digest0 = coord.query("SELECT digest FROM globals WHERE round=0")[0]["digest"]
        real0, _ = split_aux(coord.blob(digest0))
    finally:
        shut_down(coord, clients.values())

    text = TASK + """
[task.algorithm]
name = "fedprox"
mu = 0.1
[experiment]
name = "equivalence"
dataset = "DATA"
partition = "sites"
num_clients = 2
rounds = 1
seeds = [0]
""".replace("DATA", str(tmp_path / "data"))
    variants = expand_grid(_raw(text))
    out = tmp_path / "bench"
    run_study(variants, out)
    simulated, _ = split_aux(adapters.from_bytes((out / "trials" / "equivalence" / "seed-0" /
                                                  "global.safetensors").read_bytes()))
    assert sorted(simulated) == sorted(real)
    moved = max((real[k] - real0[k]).abs().max().item() for k in real)
    assert moved > 1e-4  # the round trained something, well above the tolerance of the comparison
    for key in real:
        assert torch.allclose(simulated[key], real[key], atol=1e-6, rtol=1e-5), key


def _fake_results(folder: Path, entries: list[tuple[str, dict, str, dict]]) -> str:
    """A results folder of one-round, one-seed trials: (name, swept values, [experiment] lines, final metrics) per
    variant; returns the report written for it."""
    from fedvlm.study.report import write_report

    variants = []
    for name, values, experiment, metrics in entries:
        config = BenchConfig.from_dict(_raw(TASK + f"[experiment]\n{experiment}\n")).to_dict()
        variants.append({"name": name, "values": values, "config": config, "seeds": [0]})
        trial = folder / "trials" / name / "seed-0"
        trial.mkdir(parents=True)
        (trial / "rounds.jsonl").write_text(json.dumps({"round": 1, "metrics": metrics, "bytes_up": 0,
                                                        "bytes_down": 0, "seconds": 1.0}) + "\n")
        (trial / "summary.json").write_text(json.dumps({"final_metrics": metrics, "bytes_up": 0, "bytes_down": 0,
                                                        "wall_seconds": 1.0}))
        (trial / "DONE").write_text("")
    (folder / "study.json").write_text(json.dumps({"variants": variants}))
    return write_report(folder).read_text()


def test_multitask_report_draws_a_radar(tmp_path):
    """Per-task primary metrics (``<task>/<primary>``) of the variants land in radar.png, relative to the best;
    with only the partition swept, the heterogeneity table has one federated line."""
    report = _fake_results(tmp_path, [
        ("partition=iid", {"experiment.partition": "iid"}, 'partition = "iid"',
         {"classification/accuracy": 0.3, "vqa/accuracy": 0.4, "captioning/cider": 0.3}),
        ("partition=task", {"experiment.partition": "task"}, 'partition = "task"',
         {"classification/accuracy": 0.5, "vqa/accuracy": 0.4, "captioning/cider": 0.2}),
        ("centralized", {"experiment.baseline": "centralized"}, 'baseline = "centralized"',
         {"classification/accuracy": 0.6, "vqa/accuracy": 0.3, "captioning/cider": 0.4})])
    assert "## Per task (multi-task)" in report and "![per-task radar](radar.png)" in report
    assert (tmp_path / "radar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| federated | centralized |" not in report and "| centralized |  | centralized | 1/1 |" in report
    # only the partition is swept: the federated variants form one line from IID to one task per client
    assert "| all | federated | 0.300 | 0.500 (task) | -0.200 | -67% |" in report


def test_report_of_a_grid_over_tasks_leads_each_variant_with_its_own_metric(tmp_path):
    """A grid over datasets of different tasks: VQA rows show accuracy, captioning rows CIDEr (not a blank)."""
    report = _fake_results(tmp_path, [
        ("dataset=vqa", {"experiment.dataset": "vqa"}, 'dataset = "vqa"', {"accuracy": 0.4, "accuracy_open": 0.3}),
        ("dataset=captioning", {"experiment.dataset": "captioning"}, 'dataset = "captioning"',
         {"cider": 0.6, "bleu_4": 0.1})])
    assert "headline metric: `accuracy`, `cider`" in report
    assert "| dataset=vqa | vqa | federated | 1/1 | accuracy 0.4000 ± 0.0000 |" in report
    assert "| dataset=captioning | captioning | federated | 1/1 | cider 0.6000 ± 0.0000 |" in report
    assert "| variant | accuracy_open | bleu_4 |" in report  # the headlines are not repeated under all metrics


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sweep_on_a_local_ray_cluster(tmp_path, cache):
    """`--ray ADDRESS`: a real Ray head on 127.0.0.1 runs the trials as tasks; the driver writes every trial's
    files and the report; a re-run runs nothing; an unreachable address fails at once and writes nothing."""
    import subprocess
    import sys

    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "FEDVLM_CACHE": str(cache), "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        grid = tmp_path / "grid.toml"
        grid.write_text(SWEEP.replace("rounds = 2", "rounds = 1"))
        out = tmp_path / "out"
        command = [str(Path(sys.executable).with_name("fedvlm")), "bench", "sweep", str(grid), "--out", str(out),
                   "--ray", f"127.0.0.1:{port}"]
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "4 trial(s) run" in first.stdout
        for trial in trials_of(expand_grid(_raw(grid.read_text()))):
            folder = out / "trials" / trial.variant / f"seed-{trial.seed}"
            assert {"DONE", "summary.json", "rounds.jsonl", "clients.jsonl", "global.safetensors",
                    "config.json"} <= {p.name for p in folder.iterdir()}
            assert "accuracy" in json.loads((folder / "summary.json").read_text())["final_metrics"]
        assert "| partition=iid | iid | federated | 2/2 |" in (out / "report.md").read_text()
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and "0 trial(s) run" in again.stdout, again.stdout + again.stderr
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
    result = CliRunner().invoke(app, ["bench", "sweep", str(grid), "--out", str(tmp_path / "none"), "--ray",
                                      f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and "cannot reach the Ray cluster" in result.output
    assert not (tmp_path / "none").exists()
