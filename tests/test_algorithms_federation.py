"""Algorithms in the real federation: coordinator daemon + two fedvlm-client processes over mTLS, tiny VLM.

One run per client-side family, kept cheap (2 sites, short rounds, small local test splits):
- scaffold: control-variate deltas travel with the updates, c with the globals, c_i in each site's --state;
- fedprox with central DP: the proximal loss term inside the real loop, clipping + noise at the coordinator and
  the privacy spent shown per round by `fedvlm-coord status`.
The server steps of the other algorithms need nothing from the clients beyond FedAvg's and run through the real
coordinator in test_algorithms_restart.py.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from fedvlm import adapters
from fedvlm.algorithms.aggregation import dp_epsilon
from fedvlm.data.digits import build_digits
from fedvlm.vlm.presets import preset_dir

from .harness import Coordinator, coord_cli, shut_down, start_sites, wait_sites_ok

# Real processes (a coordinator daemon, sites): the slow half of `make test`.
pytestmark = pytest.mark.slow

CONFIG = """
name = "algo-vlm"
[run]
rounds = {rounds}
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "60s"
final_eval = false
[task]
model = "tiny-llava"
[task.train]
local_epochs = 0.1
batch_size = 8
lr = 0.001
max_steps = 4
[task.algorithm]
{algorithm}
"""

CASES = {  # case: (rounds, [task.algorithm])
    "scaffold": (2, 'name = "scaffold"'),
    "fedprox-dp": (1, 'name = "fedprox"\nmu = 0.01\nclip_norm = 1.0\ndp_noise_multiplier = 0.5'),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    preset_dir("tiny-llava", path)  # built once for every run of the module
    return path


@contextmanager
def federation(tmp_path, cache, rounds: int, algorithm: str, extra=lambda index: ()):
    """Two digits sites (small local test splits: evaluation is not what is tested here) through a coordinator
    daemon with `[task.algorithm]` = `algorithm`; yields the coordinator once both sites exited 0. `extra(i)`: more
    `fedvlm-client` arguments for site i."""
    layout = build_digits(tmp_path / "data", sites=2, seed=0)
    for site in layout.site_dirs:
        test = site / "test.json"
        test.write_text(json.dumps(json.loads(test.read_text())[:8]))
    coord = Coordinator(tmp_path / "coord", CONFIG.format(rounds=rounds, algorithm=algorithm))
    coord.start()
    clients = {}
    try:
        clients = start_sites(coord, layout.site_dirs, tmp_path, cache, extra=extra)
        wait_sites_ok(clients, tmp_path)
        yield coord
    finally:
        shut_down(coord, clients.values())


@pytest.mark.parametrize("case", sorted(CASES))
def test_algorithm_runs_in_the_real_federation(tmp_path, cache, case):
    rounds, algorithm = CASES[case]
    with federation(tmp_path, cache, rounds, algorithm) as coord:
        assert [r["round"] for r in coord.query("SELECT round FROM globals ORDER BY round")] == list(range(rounds + 1))
        digest = coord.query("SELECT digest FROM globals WHERE round=?", (rounds,))[0]["digest"]
        aux = [k for k in coord.blob(digest) if k.startswith("fedvlm.aux/")]
        status = json.loads(coord_cli("status", "--dir", str(coord.fed.root), "--json"))
        shown = {r["round"]: r for r in status["rounds"]}
        if case == "scaffold":
            assert aux and all(k.startswith("fedvlm.aux/scaffold.c/") for k in aux)
            for name in ("site-1", "site-2"):  # c_i of the last round (and the one before) kept in --state
                kept = sorted(p.name for p in (tmp_path / "sites" / name / "algorithm").iterdir())
                assert len(kept) == 2 and kept[-1].endswith(".r2.safetensors"), kept
            update = coord.query("SELECT digest FROM updates WHERE round=2 LIMIT 1")[0]["digest"]
            assert any(k.startswith("fedvlm.aux/scaffold.dc/") for k in coord.blob(update))
        else:
            assert not aux
            server = shown[1]["server_metrics"]
            assert server["dp_epsilon"] == pytest.approx(dp_epsilon(0.5, 1, 1e-5)) and server["dp_rounds"] == 1
            assert server["dp_delta"] == pytest.approx(1e-5) and shown[0]["server_metrics"] == {}
        out = tmp_path / "export"
        coord_cli("export", "--dir", str(coord.fed.root), "--out", str(out))
        exported = adapters.from_bytes((out / "adapter_model.safetensors").read_bytes())
        assert not [k for k in exported if k.startswith("fedvlm.aux/")]


def rank_four_second_site(index: int) -> tuple[str, ...]:
    return ("--lora-rank", "4") if index == 1 else ()


def test_sites_of_different_lora_ranks_with_exact_aggregation(tmp_path, cache):
    """lora_exact: a `fedvlm-client --lora-rank 4` next to a default-rank (8) site for one round; the initial
    adapter is built at the task's rank whichever site builds it, the rank-4 site uploads rank-4 factors and the
    global keeps rank 8."""
    def ranks(adapter):
        return {v.shape[0] for k, v in adapter.items() if k.endswith("lora_A.weight")}

    with federation(tmp_path, cache, 1, "lora_exact = true", extra=rank_four_second_site) as coord:
        globals_ = coord.query("SELECT round, digest FROM globals ORDER BY round")
        assert [g["round"] for g in globals_] == [0, 1]
        assert ranks(coord.blob(globals_[0]["digest"])) == {8} and ranks(coord.blob(globals_[1]["digest"])) == {8}
        sent = {r["client"]: ranks(coord.blob(r["digest"]))
                for r in coord.query("SELECT client, digest FROM updates WHERE round=1")}
        assert sent == {"site-1": {8}, "site-2": {4}}


def test_flora_with_sites_of_different_ranks_and_its_export(tmp_path, cache):
    """lora_aggregation = "flora" through real processes: a rank-8 site and a `--lora-rank 4` site for two rounds.
    The updates carry their own ranks, global 2 carries the stack of both rounds (8 + 4 per round) while its LoRA
    tensors stay global 0's, and `fedvlm-coord export` writes a PEFT adapter of the stack's rank that loads on the
    unmerged base, where it equals W0 + scaling x B_stack A_stack."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    with federation(tmp_path, cache, 2, 'lora_aggregation = "flora"', extra=rank_four_second_site) as coord:
        digests = {g["round"]: g["digest"] for g in coord.query("SELECT round, digest FROM globals")}
        first, last = coord.blob(digests[0]), coord.blob(digests[2])
        lora = [k for k in first if ".lora_" in k]
        assert lora and all(torch.equal(last[k], first[k]) for k in lora)  # the global's own LoRA: global 0's
        stack = {k: v for k, v in last.items() if k.startswith("fedvlm.aux/flora.")}
        ranks = {k: v.shape[0] for k, v in stack.items() if "flora.A/" in k}
        assert ranks and set(ranks.values()) == {24}  # (8 + 4) x 2 rounds, below min(out, in) of every layer
        sent = {(r["client"], r["round"]): {v.shape[0] for k, v in coord.blob(r["digest"]).items()
                                            if k.endswith("lora_A.weight")}
                for r in coord.query("SELECT client, round, digest FROM updates WHERE round > 0")}
        assert sent == {("site-1", 1): {8}, ("site-2", 1): {4}, ("site-1", 2): {8}, ("site-2", 2): {4}}

        out = tmp_path / "adapter"
        coord_cli("export", "--dir", str(coord.fed.root), "--round", "2", "--out", str(out))
        config = json.loads((out / "adapter_config.json").read_text())
        base = AutoModelForImageTextToText.from_pretrained(preset_dir("tiny-llava", cache))
        a_key = sorted(ranks)[0]
        module = a_key[len("fedvlm.aux/flora.A/base_model.model."):-len(".lora_A.weight")]
        original = base.get_submodule(module).weight.detach().clone()
        merged = PeftModel.from_pretrained(base, out).merge_and_unload().get_submodule(module).weight
        b_key = a_key.replace("flora.A/", "flora.B/").replace("lora_A", "lora_B")
        scaling = config["lora_alpha"] / config["r"]
        assert config["rank_pattern"][module] == 24
        assert torch.allclose(merged, original + scaling * stack[b_key] @ stack[a_key], atol=1e-5)


def test_a_dp_budget_stops_the_run_and_status_says_why(tmp_path, cache):
    """dp_max_epsilon through real processes: sigma 2 spends 4.73 in round 1 and 7.08 after round 2 (every site in
    every round), so a budget of 5 lets one round of three run; the sites are told the run stopped and exit, and
    `fedvlm-coord status` shows why."""
    algorithm = "clip_norm = 1.0\ndp_noise_multiplier = 2.0\ndp_max_epsilon = 5.0"
    with federation(tmp_path, cache, 3, algorithm) as coord:
        assert [r["round"] for r in coord.query("SELECT round FROM globals ORDER BY round")] == [0, 1]
        status = json.loads(coord_cli("status", "--dir", str(coord.fed.root), "--json"))
        assert status["run_state"] == "stopped"
        reason = "privacy budget reached after round 1: round 2 would spend epsilon 7.08 > dp_max_epsilon 5"
        assert status["stop_reason"].startswith(reason)
        assert status["rounds"][1]["server_metrics"]["dp_epsilon"] == pytest.approx(4.7285, abs=1e-3)
        shown = coord_cli("status", "--dir", str(coord.fed.root))
        assert "stopped in round 2 of 3: privacy budget reached after round 1" in " ".join(shown.split())


def test_rolora_sends_b_then_a_through_intake(tmp_path, cache):
    """lora_aggregation = "rolora" through real processes: round 1's updates carry lora_B (and the connector) only,
    round 2's lora_A only; intake accepts both subsets, and each global changes only the factor of its round."""
    with federation(tmp_path, cache, 2, 'lora_aggregation = "rolora"') as coord:
        for row in coord.query("SELECT round, digest FROM updates WHERE round > 0"):
            factors = {k.split(".lora_")[1][0] for k in coord.blob(row["digest"]) if ".lora_" in k}
            assert factors == ({"B"} if row["round"] == 1 else {"A"}), row["round"]
        g = {r["round"]: coord.blob(r["digest"]) for r in coord.query("SELECT round, digest FROM globals")}
        for number, frozen in ((1, "lora_A"), (2, "lora_B")):
            same = [k for k in g[0] if f".{frozen}." in k]
            assert same and all(torch.equal(g[number][k], g[number - 1][k]) for k in same), number
