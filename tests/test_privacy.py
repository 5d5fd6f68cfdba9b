"""Central DP that is enforced: the accountant with the coordinator's client sampling, the budget that stops a run
(`dp_max_epsilon`, shown by `status`), and adaptive clipping (Andrew et al. 2021)."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import rdp_privacy_accountant

from fedvlm.algorithms import algorithm_config, build
from fedvlm.algorithms.base import ClientUpdate
from fedvlm.algorithms.privacy import FULL, Sampling, budget_refusal, epsilon, round_sampling
from fedvlm.coordinator.config import RunConfig
from fedvlm.coordinator.state import RunState
from fedvlm.coordinator.status import snapshot
from fedvlm.spec import SpecError, TaskSpec
from fedvlm.status_view import headline

from .inprocess import InProcessCoordinator, tensors


def updates(*pairs) -> list[ClientUpdate]:
    return [ClientUpdate(float(n), lambda t=t: (dict(t), {})) for n, t in pairs]


def test_unsampled_rounds_are_gaussians_of_half_the_noise_multiplier():
    """Replace-one adjacency: the sum's sensitivity is 2C, so sigma C of noise is a multiplier of sigma / 2 (checked
    against the add/remove accountant, which has sensitivity C)."""
    plain = rdp_privacy_accountant.RdpAccountant()
    plain.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.5), 4))
    assert epsilon(1.0, [FULL] * 4, 1e-5) == pytest.approx(plain.get_epsilon(1e-5))


def test_sampling_without_replacement_amplifies_and_its_rate_is_bounded_by_min_clients():
    full, sampled = epsilon(2.0, [FULL] * 20, 1e-5), epsilon(2.0, [Sampling(10, 3)] * 20, 1e-5)
    assert 0 < sampled < 0.7 * full
    assert epsilon(2.0, [Sampling(20, 3)] * 20, 1e-5) < sampled  # more sites to draw from: less spent
    assert epsilon(2.0, [Sampling(3, 3)] * 20, 1e-5) == pytest.approx(full)
    assert round_sampling(10, 3, attempt=1) == Sampling(10, 3)
    assert round_sampling(10, 3, attempt=2) == FULL  # a second draw of the round: no amplification claimed


def test_the_server_records_every_rounds_sampling():
    algorithm = build(algorithm_config(clip_norm=1.0, dp_noise_multiplier=1.0))
    base = {"w": torch.zeros(4)}
    state = algorithm.initial_state(base)
    ups = updates((1, {"w": torch.ones(4)}), (1, {"w": -torch.ones(4)}))
    r1 = algorithm.aggregate(base, ups, state, 1, Sampling(10, 2))
    r2 = algorithm.aggregate(base, ups, r1.state, 2, None)
    assert r2.state["dp.sampling"].tolist() == [[10, 2], [1, 1]]
    assert r2.metrics["dp_epsilon"] == pytest.approx(epsilon(1.0, [Sampling(10, 2), FULL], 1e-5))
    assert r1.metrics["dp_epsilon"] < epsilon(1.0, [FULL], 1e-5)


def test_budget_refusal_names_the_round_and_the_numbers():
    config = algorithm_config(clip_norm=1.0, dp_noise_multiplier=1.0, dp_max_epsilon=12.0)
    state = build(config).initial_state({})
    assert budget_refusal(config, state, FULL, 1) == ""
    state["dp.rounds"] = torch.tensor(50)  # a state written before sampling was recorded: 50 unsampled rounds
    refusal = budget_refusal(config, state, FULL, 51)
    assert refusal.startswith("privacy budget reached after round 50: round 51 would spend epsilon ")
    assert "dp_max_epsilon 12" in refusal and "in 50 rounds" in refusal
    assert budget_refusal(algorithm_config(clip_norm=1.0, dp_noise_multiplier=1.0), state, FULL, 51) == ""


def test_the_driver_stops_the_run_before_the_round_that_would_exceed_the_budget(tmp_path):
    sigma, delta = 2.0, 1e-5
    budget = (epsilon(sigma, [FULL] * 2, delta) + epsilon(sigma, [FULL] * 3, delta)) / 2  # 2 rounds fit, 3 do not
    task = TaskSpec.from_dict({"algorithm": {"clip_norm": 1.0, "dp_noise_multiplier": sigma,
                                             "dp_max_epsilon": budget}})
    coord = InProcessCoordinator(tmp_path, RunConfig(rounds=5, min_clients=3, clients_per_round=3, quorum=3,
                                                     round_deadline=100.0, final_eval=False), task)
    coord.open_round_one(tensors(0.0))
    for number in (1, 2):
        assert coord.run.round == number and coord.run.state is RunState.RUNNING
        for name, value in (("a", -0.5), ("b", 0.1), ("c", 0.5)):
            coord.send(name, tensors(value + number))
        coord.driver.tick()
    run = coord.run
    assert run.state is RunState.STOPPED and run.round == 3
    assert run.stop_reason.startswith("privacy budget reached after round 2: round 3 would spend epsilon")
    assert coord.state.assignments(run.run_id, 3) == {}  # nobody was asked to train round 3
    status = snapshot(coord.state, live=True)
    spent = status["rounds"][2]["server_metrics"]["dp_epsilon"]
    assert spent == pytest.approx(epsilon(sigma, [FULL] * 2, delta)) and spent <= budget
    assert "privacy budget reached after round 2" in headline(status)


def test_adaptive_clipping_tracks_the_quantile_of_the_update_norms():
    algorithm = build(algorithm_config(clip_norm=0.5, clip_mode="adaptive", clip_quantile=0.5, clip_lr=0.2))
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    ups = updates(*[(1, {"w": torch.tensor([float(n), 0.0], dtype=torch.float64)}) for n in range(1, 10)])
    state: dict = algorithm.initial_state(base)
    for r in range(1, 60):
        result = algorithm.aggregate(base, ups, state, r)
        state = result.state
    assert 4.0 < float(state["clip.norm"]) < 6.0  # the median norm is 5
    used = result.metrics["clip_norm"]
    expected = sum(min(1.0, used / n) * n for n in range(1, 10)) / 9  # every delta clipped to the round's norm
    assert result.tensors["w"][0].item() == pytest.approx(expected)


def test_adaptive_clipping_with_dp_gives_the_count_its_share_of_the_noise():
    z, count_std = 1.0, 2.0
    algorithm = build(algorithm_config(clip_norm=1.0, clip_mode="adaptive", clip_count_stddev=count_std,
                                       dp_noise_multiplier=z))
    base = {"w": torch.zeros(40000)}
    result = algorithm.aggregate(base, updates((1, {"w": torch.zeros(40000)}), (1, {"w": torch.zeros(40000)})),
                                 algorithm.initial_state(base), 1)
    delta_multiplier = (z ** -2 - (2 * count_std) ** -2) ** -0.5
    assert float(result.tensors["w"].std()) == pytest.approx(delta_multiplier * 1.0 / 2, rel=0.02)
    assert result.metrics["dp_epsilon"] == pytest.approx(epsilon(z, [FULL], 1e-5))  # the pair costs one z
    assert float(result.state["clip.norm"]) > 0 and math.isfinite(result.metrics["clip_unclipped_fraction"])


@pytest.mark.parametrize(("raw", "key"), [
    ({"dp_max_epsilon": 3.0}, "task.algorithm.dp_max_epsilon"),
    ({"clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_max_epsilon": -1.0}, "task.algorithm.dp_max_epsilon"),
    ({"clip_mode": "auto"}, "task.algorithm.clip_mode"),
    ({"clip_mode": "adaptive"}, "task.algorithm.clip_norm"),
    ({"clip_norm": 1.0, "clip_mode": "adaptive", "clip_quantile": 1.0}, "task.algorithm.clip_quantile"),
    ({"clip_norm": 1.0, "clip_mode": "adaptive", "clip_lr": 0.0}, "task.algorithm.clip_lr"),
    ({"clip_norm": 1.0, "clip_mode": "adaptive", "dp_noise_multiplier": 1.0, "clip_count_stddev": 0.5},
     "task.algorithm.clip_count_stddev"),
])
def test_dp_keys_are_validated_at_load(raw, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        TaskSpec.from_dict({"algorithm": raw})
