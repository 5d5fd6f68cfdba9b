"""Server state persists with the global: a coordinator SIGKILLed between and during rounds ends on the same global
as an uninterrupted run (FedAdam's moments, SCAFFOLD's control variate). Protocol-level sites send hand-made,
deterministic updates over real mTLS, so each run takes seconds. Also: aux tensors are checked at intake and
stripped by export. The reference is the same three rounds computed in-process with no coordinator at all."""

from __future__ import annotations

import json
import tomllib

import grpc
import pytest
import torch

from fedvlm import adapters
from fedvlm.algorithms import build
from fedvlm.algorithms.base import ClientUpdate, split_aux, with_aux
from fedvlm.spec import TaskSpec
from fedvlm.wire.v1 import federation_pb2 as pb

from .harness import Coordinator, RawSite, coord_cli, rpc_code, tensors_bytes, wait_for

# Real processes (a coordinator daemon, sites): the slow half of `make test`.
pytestmark = pytest.mark.slow

CONFIG = """
name = "algo-fed"
[run]
rounds = 3
min_clients = 2
clients_per_round = 2
quorum = 2
round_deadline = "300s"
poll_interval = 0.2
heartbeat_timeout = "60s"
final_eval = false
[task]
model = "tiny-llava"
[task.algorithm]
name = "{name}"
aggregator = "{aggregator}"
eta = 0.1
"""


def config(name: str) -> str:
    """FedAdam runs with the coordinate-wise median (the non-streaming path), SCAFFOLD with the weighted mean."""
    return CONFIG.format(name=name, aggregator="median" if name == "fedadam" else "mean")


def init_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.lora_A.weight": torch.randn(4, 8, generator=g),
            "layer.lora_B.weight": torch.randn(8, 4, generator=g)}


def site_step(name: str, round_index: int, base: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A deterministic 'local training' result: (new adapter, SCAFFOLD control-variate deltas)."""
    seed = {"a": 1, "b": 2}[name] * 100 + round_index
    g = torch.Generator().manual_seed(seed)
    new = {k: base[k] + 0.1 * torch.randn(base[k].shape, generator=g) for k in sorted(base)}
    dc = {f"fedvlm.aux/scaffold.dc/{k}": 0.01 * torch.randn(base[k].shape, generator=g) for k in sorted(base)}
    return new, dc


def fetch(site: RawSite, digest: str) -> dict[str, torch.Tensor]:
    chunks = site.stub.FetchGlobal(pb.FetchGlobalRequest(digest=digest), timeout=10)
    return adapters.from_bytes(b"".join(c.data for c in chunks))


def run_federation(root, name: str, kills: set[tuple[str, int]], checks: bool = False) -> dict[str, torch.Tensor]:
    """Three rounds; kills holds ("during", r) (after site a's round-r update) and ("between", r) (after global r)."""
    coord = Coordinator(root / "coord", config(name))
    coord.start()
    sites = {n: RawSite(coord, n, root) for n in ("a", "b")}
    try:
        first = wait_for(lambda: (t := sites["a"].poll()).action == pb.ACTION_INIT and t, 30, "init")
        metadata = {adapters.ADAPTER_CONFIG_METADATA: json.dumps({"peft_type": "LORA"})}
        if checks:  # the initial adapter defines the schema: it may not carry aux tensors
            bad = tensors_bytes({**init_tensors(), "fedvlm.aux/x": torch.zeros(1)}, metadata)
            assert rpc_code(lambda: sites["a"].send(sites["a"].manifest(first, bad), bad)) == \
                grpc.StatusCode.INVALID_ARGUMENT
        data = tensors_bytes(init_tensors(), metadata)
        sites["a"].send(sites["a"].manifest(first, data), data)
        for r in (1, 2, 3):
            for n in ("a", "b"):
                task = wait_for(lambda n=n, r=r: train_task(sites, n, r), 60, f"{n}'s round {r}")
                base, _ = split_aux(fetch(sites[n], task.global_version.digest))
                new, dc = site_step(n, r, base)
                update = {**new, **dc} if name == "scaffold" else new
                if checks and r == 1 and n == "b":
                    assert_aux_checked(coord, sites[n], task, new, dc)
                data = tensors_bytes(update)
                sites[n].send(sites[n].manifest(task, data, num_examples={"a": 30, "b": 10}[n]), data)
                if ("during", r) in kills and n == "a":
                    coord.kill()
                    coord.start()
            wait_for(lambda r=r: coord.count("globals") == r + 1, 60, f"global {r}")
            if ("between", r) in kills:
                coord.kill()
                coord.start()
        digest = coord.query("SELECT digest FROM globals WHERE round=3")[0]["digest"]
        final = coord.blob(digest)
        if checks:
            out = root / "export"
            coord_cli("export", "--dir", str(coord.fed.root), "--round", "3", "--out", str(out))
            exported = adapters.from_bytes((out / "adapter_model.safetensors").read_bytes())
            assert set(exported) == set(init_tensors())  # aux tensors are stripped: PEFT loads the export
            assert "audit log OK" in coord_cli("audit", "verify", "--dir", str(coord.fed.root))
        return final
    finally:
        for site in sites.values():
            site.close()
        coord.kill()


def train_task(sites: dict[str, RawSite], name: str, round_index: int):
    """Poll every site (all must look live to be sampled); `name`'s training assignment for the round, if open."""
    tasks = {n: site.poll() for n, site in sites.items()}
    task = tasks[name]
    return task if task.action == pb.ACTION_TRAIN and task.round == round_index else None


def assert_aux_checked(coord: Coordinator, site: RawSite, task, new: dict, dc: dict) -> None:
    """Aux tensors must be exactly what the algorithm expects: missing or mis-shaped ones are refused."""
    bad_cases = [new, {**new, **{k: torch.zeros(3) for k in dc}}, {**new, **dc, "fedvlm.aux/other": torch.zeros(1)}]
    for tensors in bad_cases:
        data = tensors_bytes(tensors)
        assert rpc_code(lambda data=data: site.send(site.manifest(task, data), data)) == \
            grpc.StatusCode.INVALID_ARGUMENT
    assert coord.query("SELECT state FROM assignments WHERE round=1 AND client='b'") == [{"state": "assigned"}]


def uninterrupted_reference(name: str) -> dict[str, torch.Tensor]:
    """The same three rounds computed in-process, without any coordinator: what an uninterrupted run gives."""
    algorithm = build(TaskSpec.from_dict(tomllib.loads(config(name))["task"]).algorithm)
    x = init_tensors()
    state = algorithm.initial_state(x)
    aux: dict = {}
    for r in (1, 2, 3):
        updates = []
        for n in ("a", "b"):  # the coordinator aggregates in client-name order
            new, dc = site_step(n, r, x)
            updates.append(ClientUpdate({"a": 30, "b": 10}[n], lambda new=new, dc=dc: split_aux({**new, **dc})
                                        if name == "scaffold" else (new, {})))
        result = algorithm.aggregate(x, updates, state, r)
        x, state, aux = {**x, **result.tensors}, result.state, result.aux
    return with_aux(x, aux)


@pytest.mark.parametrize("name", ["fedadam", "scaffold"])
def test_restarted_coordinator_continues_exactly(tmp_path, name):
    kills = {("between", 1), ("during", 2)} if name == "scaffold" else {("during", 2)}
    restarted = run_federation(tmp_path, name, kills, checks=name == "scaffold")
    uninterrupted = uninterrupted_reference(name)
    assert set(uninterrupted) == set(restarted)
    if name == "scaffold":
        assert any(k.startswith("fedvlm.aux/scaffold.c/") for k in restarted)  # c travels with the global
    for key in uninterrupted:
        assert torch.allclose(uninterrupted[key], restarted[key], atol=1e-6), key
    if name == "fedadam":  # the moments matter: a restart that lost them would not match
        plain = uninterrupted_reference("fedavg")
        assert not torch.allclose(plain["layer.lora_A.weight"], restarted["layer.lora_A.weight"], atol=1e-3)
