"""Corrections found by checking the algorithms against their papers (issue 14): SCAFFOLD's two means use the
same weights, Krum's K > 2f + 2, VQA's comma in numbers."""

from __future__ import annotations

import pytest
import torch

from fedvlm.algorithms import aggregation, algorithm_config, build
from fedvlm.algorithms.base import ClientUpdate
from fedvlm.coordinator.config import FederationConfig
from fedvlm.spec import SpecError
from fedvlm.tasks.vqa import normalize_vqa, vqa_accuracy

COUNTS = (1, 1, 1, 1, 20)


def problems(dim: int = 4):
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(len(COUNTS)):
        a = torch.randn(12, dim, generator=g, dtype=torch.float64) * (1 + 0.5 * k)
        b = a @ torch.randn(dim, generator=g, dtype=torch.float64) + 2.0 * k
        out.append((a, b))
    return out


def optimum(weights) -> torch.Tensor:
    """argmin sum_k w_k 0.5 ||A_k w - b_k||^2."""
    ps = problems()
    h = sum(w * a.T @ a for w, (a, _) in zip(weights, ps, strict=True))
    return torch.linalg.solve(h, sum(w * a.T @ b for w, (a, b) in zip(weights, ps, strict=True)))


def scaffold_federation(rounds: int = 150, local_steps: int = 5, lr: float = 1e-3) -> torch.Tensor:
    ps = problems()
    algorithm = build(algorithm_config("scaffold"))
    x = {"w": torch.zeros(ps[0][0].shape[1], dtype=torch.float64)}
    state, global_aux = algorithm.initial_state(x), {}
    client_states: list[dict] = [{} for _ in ps]
    for r in range(1, rounds + 1):
        updates = []
        for k, (a, b) in enumerate(ps):
            w = torch.nn.Parameter(x["w"].clone())
            hook = algorithm.client_hook({"w": w}, global_aux, client_states[k])
            for _ in range(local_steps):
                w.grad = None
                (0.5 * (a @ w - b).square().sum()).backward()
                hook.after_backward()
                with torch.no_grad():
                    w -= lr * w.grad
            aux, new_state = hook.finish()
            client_states[k] = {**client_states[k], **new_state}
            updates.append(ClientUpdate(float(COUNTS[k]), lambda w=w.detach().clone(), aux=aux: ({"w": w}, aux)))
        result = algorithm.aggregate(x, updates, state, r)
        x, state, global_aux = result.tensors, result.state, result.aux
    return x["w"]


def test_scaffold_with_counts_1_1_1_1_20_converges_to_the_example_weighted_optimum():
    weighted, unweighted = optimum(COUNTS), optimum([1] * len(COUNTS))
    assert float((weighted - unweighted).norm() / weighted.norm()) > 0.1  # the two objectives differ here
    reached = scaffold_federation()
    assert float((reached - weighted).norm() / weighted.norm()) < 1e-6
    assert float((reached - unweighted).norm() / weighted.norm()) > 0.1


def test_scaffold_control_variate_uses_the_model_steps_weights():
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    dcs = [{"scaffold.dc/w": torch.tensor([1.0, 0.0])}, {"scaffold.dc/w": torch.tensor([0.0, 4.0])}]

    def ups():
        return [ClientUpdate(n, lambda aux=aux: ({"w": torch.ones(2, dtype=torch.float64)}, aux))
                for n, aux in zip((3.0, 1.0), dcs, strict=True)]

    weighted = build(algorithm_config("scaffold")).aggregate(base, ups(), {}, 1)
    assert torch.allclose(weighted.state["c/w"], torch.tensor([0.75, 1.0], dtype=torch.float64))  # 3/4, 1/4
    median = build(algorithm_config("scaffold", aggregator="median")).aggregate(base, ups(), {}, 1)
    assert torch.allclose(median.state["c/w"], torch.tensor([0.5, 2.0], dtype=torch.float64))  # equal weights


def test_krum_refuses_k_at_most_2f_plus_2_naming_the_numbers():
    deltas = [{"w": torch.tensor([float(v)])} for v in range(4)]
    with pytest.raises(ValueError, match=r"f = 1 .*K > 2f \+ 2 = 4 .*K = 4"):
        aggregation.krum(deltas, byzantine=1, select=1)
    assert aggregation.krum(deltas + [{"w": torch.tensor([1.5])}], byzantine=1, select=1)["w"].item() == 1.5
    raw = {"run": {"min_clients": 4, "clients_per_round": 4, "quorum": 4},
           "task": {"algorithm": {"aggregator": "krum", "krum_byzantine": 1}}}
    with pytest.raises(SpecError, match=r"task\.algorithm\.krum_byzantine: .*2f \+ 2 = 4.*run\.quorum = 4"):
        FederationConfig.from_dict(raw)
    raw["run"].update(min_clients=5, clients_per_round=5, quorum=5)
    assert FederationConfig.from_dict(raw).task.algorithm.aggregator == "krum"


def test_vqa_strips_the_comma_in_numbers_as_the_official_evaluation():
    assert normalize_vqa("1,000") == normalize_vqa("1000") == "1000"
    assert normalize_vqa("1,000,000 dogs.") == "1000000 dogs"
    assert normalize_vqa("red, white") == "red white"  # a comma between words is punctuation
    assert vqa_accuracy(["1,000"], ["1000"])["accuracy"] == 1.0
