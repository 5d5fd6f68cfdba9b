"""Federated optimisation algorithms as pure math: server steps against hand-computed values, client hooks, a
heterogeneous synthetic problem (client drift), robust aggregation under a faulty site, central DP, exact LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from fedvlm.algorithms import aggregation, build, slices
from fedvlm.algorithms import algorithm_config as AlgorithmSpec
from fedvlm.algorithms.base import ClientUpdate, split_aux, with_aux
from fedvlm.algorithms.lora_exact import refactorise
from fedvlm.algorithms.registry import REGISTRY
from fedvlm.algorithms.registry import REGISTRY as ALGORITHMS
from fedvlm.spec import SpecError, TaskSpec


def updates_of(*pairs):
    """ClientUpdates from (weight, tensors[, aux]) tuples."""
    out = []
    for pair in pairs:
        weight, tensors = pair[0], pair[1]
        aux = pair[2] if len(pair) > 2 else {}
        out.append(ClientUpdate(weight, lambda t=tensors, a=aux: (dict(t), dict(a))))
    return out


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


BASE = {"w": t(1.0, 2.0)}


def two_rounds(name: str, **kw):
    """Round 1: sites at w+[1,0] (3 examples) and w+[0,2] (1 example) -> mean delta [0.75, 0.5].
    Round 2 from the new global: both sites at +[-1,1] -> delta [-1, 1]."""
    algorithm = build(AlgorithmSpec(name=name, **kw))
    state = algorithm.initial_state(BASE)
    r1 = algorithm.aggregate(BASE, updates_of((3, {"w": BASE["w"] + t(1, 0)}), (1, {"w": BASE["w"] + t(0, 2)})),
                             state, 1)
    x1 = r1.tensors
    r2 = algorithm.aggregate(x1, updates_of((1, {"w": x1["w"] + t(-1, 1)}), (1, {"w": x1["w"] + t(-1, 1)})),
                             r1.state, 2)
    return r1, r2


def test_registry_matches_the_spec_names():
    build(AlgorithmSpec())
    assert set(REGISTRY) == set(ALGORITHMS)


def test_fedavg_is_the_example_weighted_mean():
    r1, r2 = two_rounds("fedavg")
    assert torch.allclose(r1.tensors["w"], t(1.75, 2.5))
    assert torch.allclose(r2.tensors["w"], t(0.75, 3.5))
    assert r1.state == {} and r1.aux == {}


def test_fedavgm_momentum_over_two_rounds():
    r1, r2 = two_rounds("fedavgm", server_lr=0.5, server_momentum=0.9)
    v1 = torch.tensor([0.75, 0.5], dtype=torch.float64)
    assert torch.allclose(r1.state["v/w"], v1)
    assert torch.allclose(r1.tensors["w"], t(1.0 + 0.5 * 0.75, 2.0 + 0.5 * 0.5))
    v2 = 0.9 * v1 + torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(r2.state["v/w"], v2)
    assert torch.allclose(r2.tensors["w"], r1.tensors["w"] + 0.5 * v2.float())


@pytest.mark.parametrize("name", ["fedadagrad", "fedyogi", "fedadam"])
def test_adaptive_server_optimizers_over_two_rounds(name):
    eta, tau, b1, b2 = 0.1, 0.01, 0.9, 0.99
    r1, r2 = two_rounds(name, eta=eta, tau=tau, beta1=b1, beta2=b2)
    x = [1.0, 2.0]
    m = [0.0, 0.0]
    v = [tau ** 2, tau ** 2]
    for d, result in (([0.75, 0.5], r1), ([-1.0, 1.0], r2)):
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * d[i]
            if name == "fedadagrad":
                v[i] = v[i] + d[i] ** 2
            elif name == "fedyogi":
                v[i] = v[i] - (1 - b2) * d[i] ** 2 * math.copysign(1.0, v[i] - d[i] ** 2)
            else:
                v[i] = b2 * v[i] + (1 - b2) * d[i] ** 2
            x[i] = x[i] + eta * m[i] / (math.sqrt(v[i]) + tau)
        assert torch.allclose(result.state["m/w"], torch.tensor(m, dtype=torch.float64))
        assert torch.allclose(result.state["v/w"], torch.tensor(v, dtype=torch.float64))
        assert torch.allclose(result.tensors["w"], torch.tensor(x), atol=1e-6), (name, result.tensors, x)


def test_adaptive_defaults_follow_fedvlmbench():
    algorithm = build(AlgorithmSpec(name="fedadam"))
    assert (algorithm.config.eta, algorithm.config.tau, algorithm.config.beta1, algorithm.config.beta2) == \
        (1e-3, 1e-3, 0.9, 0.99)
    assert build(AlgorithmSpec(name="fedprox")).config.mu == 0.01


def test_scaffold_server_step_and_global_control_variate():
    algorithm = build(AlgorithmSpec(name="scaffold", server_lr=1.0, scaffold_clients=4))
    dc1, dc2 = {"scaffold.dc/w": t(1.0, 0.0)}, {"scaffold.dc/w": t(0.0, 2.0)}
    r1 = algorithm.aggregate(BASE, updates_of((1, {"w": BASE["w"] + t(1, 1)}, dc1),
                                              (1, {"w": BASE["w"] + t(3, 1)}, dc2)), {}, 1)
    assert torch.allclose(r1.tensors["w"], t(3.0, 3.0))
    # c <- c + (1/N) sum dc_i with N = 4
    assert torch.allclose(r1.state["c/w"], torch.tensor([0.25, 0.5], dtype=torch.float64))
    assert torch.allclose(r1.aux["scaffold.c/w"], t(0.25, 0.5))
    r2 = algorithm.aggregate(r1.tensors, updates_of((1, dict(r1.tensors), dc1)), r1.state, 2)
    assert torch.allclose(r2.state["c/w"], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert algorithm.expected_aux(["w", "v"]) == {"scaffold.dc/w": "w", "scaffold.dc/v": "v"}


def test_fedprox_term_adds_mu_times_distance_to_the_gradient():
    w = torch.nn.Parameter(t(1.0, -2.0))
    hook = build(AlgorithmSpec(name="fedprox", mu=0.5)).client_hook({"w": w}, {}, {})
    with torch.no_grad():
        w.add_(t(0.4, 1.0))  # local training moved w away from the global
    loss = (w ** 2).sum()
    loss.backward()
    plain = w.grad.clone()
    w.grad = None
    (loss.detach() + (w ** 2).sum() - loss.detach() + hook.loss_term()).backward()
    assert torch.allclose(w.grad - plain, 0.5 * t(0.4, 1.0))


def test_scaffold_hook_corrects_gradients_and_sends_the_mean_local_gradient():
    w = torch.nn.Parameter(t(1.0, 1.0))
    c, c_i = {"scaffold.c/w": t(0.5, 0.0)}, {"w": t(0.1, 0.2)}
    hook = build(AlgorithmSpec(name="scaffold")).client_hook({"w": w}, c, c_i)
    for raw in (t(1.0, 1.0), t(3.0, -1.0)):  # two local steps with these raw gradients
        w.grad = raw.clone()
        hook.after_backward()
        assert torch.allclose(w.grad, raw + t(0.5 - 0.1, 0.0 - 0.2))  # g - c_i + c
    aux, state = hook.finish()
    assert torch.allclose(state["w"], t(2.0, 0.0))  # c_i+ = the mean raw gradient, whatever the optimizer did
    assert torch.allclose(aux["scaffold.dc/w"], t(2.0, 0.0) - t(0.1, 0.2))


# -- a heterogeneous problem: per-site shifted least squares ---------------------------------------------------
def make_problem(sites: int = 4, dim: int = 5):
    g = torch.Generator().manual_seed(0)
    problems = []
    for k in range(sites):
        a = torch.randn(20, dim, generator=g, dtype=torch.float64) * (1 + k)  # different curvature per site
        b = a @ torch.randn(dim, generator=g, dtype=torch.float64) + 3.0 * k  # and a shifted optimum
        problems.append((a, b))
    h = sum(a.T @ a for a, _ in problems)
    optimum = torch.linalg.solve(h, sum(a.T @ b for a, b in problems))
    return problems, optimum


def run_federation(name: str, rounds: int = 80, local_steps: int = 5, lr: float = 4e-4, **kw) -> torch.Tensor:
    """SGD on 0.5 ||A w - b||^2 per site (full gradients), every site in every round, equal weights."""
    problems, _ = make_problem()
    algorithm = build(AlgorithmSpec(name=name, **kw))
    x = {"w": torch.zeros(problems[0][0].shape[1], dtype=torch.float64)}
    state = algorithm.initial_state(x)
    global_aux: dict = {}
    client_states: list[dict] = [{} for _ in problems]
    for r in range(1, rounds + 1):
        updates = []
        for k, (a, b) in enumerate(problems):
            w = torch.nn.Parameter(x["w"].clone())
            hook = algorithm.client_hook({"w": w}, global_aux, client_states[k])
            for _ in range(local_steps):
                loss = 0.5 * (a @ w - b).square().sum()
                extra = hook.loss_term()
                w.grad = None
                (loss if extra is None else loss + extra).backward()
                hook.after_backward()
                with torch.no_grad():
                    w -= lr * w.grad
            aux, new_state = hook.finish()
            client_states[k] = {**client_states[k], **new_state}
            updates.append((1, {"w": w.detach().clone()}, aux))
        result = algorithm.aggregate(x, updates_of(*updates), state, r)
        x, state, global_aux = result.tensors, result.state, result.aux
    return x["w"]


def test_scaffold_reaches_the_optimum_where_fedavg_drifts_and_fedprox_drifts_less():
    _, optimum = make_problem()
    error = {name: float((run_federation(name, **kw) - optimum).norm() / optimum.norm())
             for name, kw in (("fedavg", {}), ("fedprox", {"mu": 2000.0}), ("scaffold", {}))}
    assert error["scaffold"] < 1e-6, error
    assert error["fedavg"] > 0.02, error
    assert error["fedprox"] < 0.7 * error["fedavg"], error


# -- robust aggregation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum", "mean"])
def test_one_faulty_site_of_five(aggregator, attack):
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.zeros(6, 4), "b": torch.zeros(3)}
    direction = {n: torch.ones_like(v) for n, v in base.items()}
    honest = [{n: direction[n] + 0.1 * torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(4)]
    honest_mean = {n: sum(h[n] for h in honest) / 4 for n in base}
    bad = {n: (100.0 if attack == "scaled" else -5.0) * honest_mean[n] for n in base}
    updates = updates_of(*[(10, h) for h in honest], (10, bad))
    spec = dict(name="fedavg", aggregator=aggregator, trim_ratio=0.2, krum_byzantine=1, krum_select=2)
    result = build(AlgorithmSpec(**spec)).aggregate(base, updates, {}, 1).tensors
    error = math.sqrt(sum(float((result[n] - honest_mean[n]).square().sum()) for n in base))
    scale = math.sqrt(sum(float(v.square().sum()) for v in honest_mean.values()))
    if aggregator == "mean":
        assert error > scale, error
    else:
        assert error < 0.15 * scale, (aggregator, attack, error)


def test_robust_aggregators_by_hand():
    deltas = [{"w": t(v)} for v in (1.0, 2.0, 3.0, 10.0, -50.0)]
    assert aggregation.median(deltas)["w"].item() == 2.0
    assert aggregation.median(deltas[:4])["w"].item() == 2.5
    assert aggregation.trimmed_mean(deltas, 0.2)["w"].item() == 2.0  # drops -50 and 10
    assert aggregation.krum(deltas, byzantine=1, select=1)["w"].item() == 2.0
    assert aggregation.krum(deltas, byzantine=1, select=3)["w"].item() == 2.0  # mean of 1, 2, 3


def test_norm_clipping_bounds_each_update():
    spec = AlgorithmSpec(clip_norm=1.0)
    result = build(spec).aggregate({"w": t(0.0, 0.0)}, updates_of((1, {"w": t(3.0, 4.0)}), (1, {"w": t(0.3, 0.4)})),
                                   {}, 1)
    assert torch.allclose(result.tensors["w"], (t(0.6, 0.8) + t(0.3, 0.4)) / 2)
    assert result.metrics["clipped_updates"] == 1.0


def _reference_mean(base, updates, clip_norm=0.0):
    """The streaming mean as it was written before the chunked accumulator: one float64 delta per tensor."""
    acc, total = {}, 0.0
    for update in updates:
        tensors, _ = update.load()
        scale = aggregation._clip_scale(AlgorithmSpec(clip_norm=clip_norm), base, tensors)
        for name in sorted(tensors):
            delta = tensors[name].double() - base[name].double()
            if name in acc:
                acc[name].add_(delta, alpha=float(update.weight) * scale)
            else:
                acc[name] = delta * (float(update.weight) * scale)
        total += float(update.weight)
    return {n: v.div_(total) for n, v in acc.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # float32 and bf16-trained updates
@pytest.mark.parametrize("clip_norm", [0.0, 5.0])
def test_streaming_mean_is_bit_identical_to_one_float64_delta_per_tensor(clip_norm, dtype):
    """Random data over many magnitudes (and zeros of both signs), tensors smaller and larger than a chunk, a scalar
    and an empty one, weights that are not powers of two."""
    g = torch.Generator().manual_seed(11)
    shapes = {"big": (3, slices.CHUNK + 123), "small": (7, 5), "scalar": (), "empty": (0, 4)}

    def draw(shape):
        values = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 6)
        if values.numel():
            values.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-38, -3e38])[:values.numel()]
        return values.to(dtype)

    base = {n: draw(s) for n, s in shapes.items()}
    ups = updates_of(*[(w, {n: draw(s) for n, s in shapes.items()}) for w in (3, 17, 1, 250, 9)])
    got, _, _ = aggregation.combine(AlgorithmSpec(clip_norm=clip_norm), base, ups, {}, 1)
    want = _reference_mean(base, ups, clip_norm)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == torch.float64 and got[name].shape == want[name].shape
        assert torch.equal(got[name].view(torch.int64), want[name].view(torch.int64)), name  # bit for bit


def _reference_server_step(name, base, delta, state):
    """The server steps as they were written before the sliced ones: whole-tensor float64 expressions."""
    if name == "fedavg":
        return {n: torch.add(d.double(), base[n]).to(base[n].dtype) for n, d in delta.items()}
    c = build(AlgorithmSpec(name=name)).config
    out = {}
    for n, d in delta.items():
        m_prev, v_prev = state.get(f"m/{n}"), state.get(f"v/{n}")
        m = d * (1 - c.beta1) if m_prev is None else torch.mul(m_prev.double(), c.beta1).add_(d, alpha=1 - c.beta1)
        v = torch.full_like(d, c.tau ** 2) if v_prev is None else v_prev.double()
        if name == "fedadam":
            v = torch.mul(v, c.beta2).addcmul_(d, d, value=1 - c.beta2)
        elif name == "fedadagrad":
            v = torch.addcmul(v, d, d)
        else:
            square = d.square()
            v = torch.addcmul(v, square, torch.sub(v, square).sign_(), value=-(1 - c.beta2))
        state[f"m/{n}"], state[f"v/{n}"] = m, v
        x = base[n].to(torch.float64, copy=True)
        out[n] = x.addcdiv_(m, v.sqrt().add_(c.tau), value=c.eta).to(base[n].dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedadagrad", "fedyogi"])
def test_server_steps_are_bit_identical_to_whole_tensor_float64_expressions(name, dtype):
    """Two rounds (moments created, then read back), tensors smaller and larger than a slice, a scalar, an empty
    one, deltas over many magnitudes with zeros of both signs."""
    g = torch.Generator().manual_seed(5)
    shapes = {"big": (2, slices.CHUNK + 77), "small": (3, 4), "scalar": (), "empty": (0, 2)}

    def draw(shape, dtype):
        values = torch.randn(shape, generator=g, dtype=torch.float64) * torch.exp(torch.randn(shape, generator=g) * 4)
        if values.numel():
            values.view(-1)[:2] = torch.tensor([0.0, -0.0])[:values.numel()]
        return values.to(dtype)

    algorithm = build(AlgorithmSpec(name=name))
    base = {n: draw(s, dtype) for n, s in shapes.items()}
    state, want_state = {}, {}
    for _ in range(2):
        delta = {n: draw(s, torch.float64) for n, s in shapes.items()}
        want = _reference_server_step(name, base, {n: d.clone() for n, d in delta.items()}, want_state)
        got = algorithm.server_update(base, delta, state)
        for n in shapes:
            assert got[n].dtype == dtype and got[n].shape == want[n].shape
            assert torch.equal(got[n].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               want[n].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), n
        assert set(state) == set(want_state)
        for key, value in want_state.items():
            assert state[key].shape == value.shape and torch.equal(state[key].view(torch.int64),
                                                                   value.view(torch.int64)), key
        base = got


# -- central DP ----------------------------------------------------------------------------------------------
def test_central_dp_noise_is_calibrated_reproducible_and_accounted():
    spec = AlgorithmSpec(clip_norm=1.0, dp_noise_multiplier=2.0, dp_delta=1e-5)
    algorithm = build(spec)
    base = {"w": torch.zeros(20000)}
    state = algorithm.initial_state(base)
    ups = updates_of((5, {"w": torch.zeros(20000)}), (1, {"w": torch.zeros(20000)}))
    r1 = algorithm.aggregate(base, ups, state, 1)
    again = algorithm.aggregate(base, ups, state, 1)
    assert torch.equal(r1.tensors["w"], again.tensors["w"])  # a redone aggregation gives the same global
    assert abs(float(r1.tensors["w"].std()) - 2.0 * 1.0 / 2) < 0.02  # sigma C / K
    r2 = algorithm.aggregate(r1.tensors, ups, r1.state, 2)
    assert r1.metrics["dp_rounds"] == 1 and r2.metrics["dp_rounds"] == 2
    assert 0 < r1.metrics["dp_epsilon"] < r2.metrics["dp_epsilon"]
    assert r2.metrics["dp_epsilon"] == pytest.approx(aggregation.dp_epsilon(2.0, 2, 1e-5))
    other = build(spec).initial_state(base)  # a different federation draws a different secret noise seed
    assert not torch.equal(build(spec).aggregate(base, ups, other, 1).tensors["w"], r1.tensors["w"])


# -- exact LoRA aggregation ----------------------------------------------------------------------------------
def test_exact_lora_aggregation_averages_the_products():
    g = torch.Generator().manual_seed(3)
    a1 = torch.randn(2, 6, generator=g)
    a2 = torch.randn(2, 2, generator=g) @ a1  # same row space: the mean product still has rank 2
    b1, b2 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    base = {"m.lora_A.weight": torch.zeros(2, 6), "m.lora_B.weight": torch.zeros(5, 2), "head": torch.zeros(3)}
    ups = updates_of((3, {"m.lora_A.weight": a1, "m.lora_B.weight": b1, "head": t(1, 1, 1)}),
                     (1, {"m.lora_A.weight": a2, "m.lora_B.weight": b2, "head": t(5, 5, 5)}))
    exact = build(AlgorithmSpec(lora_exact=True)).aggregate(base, ups, {}, 1).tensors
    naive = build(AlgorithmSpec()).aggregate(base, ups, {}, 1).tensors
    target = (3 * b1 @ a1 + b2 @ a2) / 4
    assert torch.allclose(exact["m.lora_B.weight"] @ exact["m.lora_A.weight"], target, atol=1e-5)
    assert not torch.allclose(naive["m.lora_B.weight"] @ naive["m.lora_A.weight"], target, atol=1e-2)
    assert torch.allclose(exact["head"], t(2, 2, 2))
    b, a = refactorise(torch.randn(7, 9, generator=g, dtype=torch.float64), 3)
    assert b.shape == (7, 3) and a.shape == (3, 9)


# -- spec and wire ---------------------------------------------------------------------------------------------
def test_algorithm_spec_from_toml_table_and_errors_name_the_key():
    spec = TaskSpec.from_dict({"algorithm": {"name": "fedadam", "aggregator": "median", "eta": 1}})
    assert spec.algorithm.name == "fedadam" and spec.algorithm.eta == 1.0
    assert TaskSpec.from_json(spec.to_json()) == spec
    for raw, key in (({"name": "fedsgd"}, "task.algorithm.name"), ({"aggregator": "mode"}, "task.algorithm.aggregator"),
                     ({"mu": "x"}, "task.algorithm.mu"), ({"typo": 1}, "task.algorithm.typo"),
                     ({"dp_noise_multiplier": 1.0}, "task.algorithm.clip_norm"),
                     ({"lora_exact": True, "name": "fedadam"}, "task.algorithm.lora_exact")):
        with pytest.raises(SpecError, match=key.replace(".", r"\.")):
            TaskSpec.from_dict({"algorithm": raw})


def test_aux_tensors_split_and_join():
    joined = with_aux({"w": t(1)}, {"scaffold.dc/w": t(2)})
    assert set(joined) == {"w", "fedvlm.aux/scaffold.dc/w"}
    adapter, aux = split_aux(joined)
    assert set(adapter) == {"w"} and set(aux) == {"scaffold.dc/w"}


def test_site_keeps_its_algorithm_state_across_restarts(tmp_path):
    """SCAFFOLD's c_i in --state: a round reads the latest earlier round's file (a round retrained after a crash
    does not read what it already wrote), the files survive a new Agent, and only two rounds' files are kept."""
    from fedvlm.client.agent import Agent
    from fedvlm.client.identity import StateDir

    def agent():
        return Agent("127.0.0.1:1", identity=None, state=StateDir(tmp_path / "site"), data_dir=tmp_path)

    first = agent()
    assert first._algorithm_state("run1", 1) == {}
    first._save_algorithm_state("run1", 1, {"w": t(1.0)})
    first._save_algorithm_state("run1", 2, {"w": t(2.0)})
    again = agent()  # a restarted site
    assert torch.equal(again._algorithm_state("run1", 2)["w"], t(1.0))  # round 2 retrained: state from round 1
    assert torch.equal(again._algorithm_state("run1", 3)["w"], t(2.0))
    again._save_algorithm_state("run1", 3, {"w": t(3.0)})
    kept = sorted(p.name for p in (tmp_path / "site" / "algorithm").iterdir())
    assert kept == ["run1.r2.safetensors", "run1.r3.safetensors"]
    assert again._algorithm_state("run2", 1) == {}  # another run starts from scratch


def test_status_table_shows_the_privacy_spent_per_round():
    from rich.console import Console

    from fedvlm.status_view import rounds_table

    status = {"rounds": [{"round": 0, "global_digest": "a" * 64, "server_metrics": {}},
                         {"round": 1, "global_digest": "b" * 64, "num_updates": 2,
                          "server_metrics": {"dp_epsilon": 4.25, "dp_delta": 1e-5, "dp_rounds": 1}}]}
    console = Console(width=160, record=True)
    console.print(rounds_table(status))
    text = console.export_text()
    assert "DP epsilon" in text and "4.25 at 1e-05" in text
    console = Console(width=160, record=True)
    console.print(rounds_table({"rounds": status["rounds"][:1]}))
    assert "DP epsilon" not in console.export_text()  # no column without DP


def test_exact_lora_aggregation_of_sites_with_different_ranks():
    from fedvlm.algorithms.lora_exact import exact_lora_mean

    g = torch.Generator().manual_seed(4)
    b1, a1 = torch.randn(5, 1, generator=g), torch.randn(1, 6, generator=g)  # rank 1
    b2, a2 = torch.randn(5, 2, generator=g), torch.randn(2, 6, generator=g)  # rank 2
    ups = updates_of((1, {"m.lora_A.weight": a1, "m.lora_B.weight": b1}),
                     (1, {"m.lora_A.weight": a2, "m.lora_B.weight": b2}))
    out, _ = exact_lora_mean(ups, {"m.lora_A.weight": 3})  # the global's rank 3 holds the rank-3 mean exactly
    assert out["m.lora_A.weight"].shape == (3, 6) and out["m.lora_B.weight"].shape == (5, 3)
    assert torch.allclose(out["m.lora_B.weight"] @ out["m.lora_A.weight"], (b1 @ a1 + b2 @ a2).double() / 2,
                          atol=1e-6)


# -- heterogeneous LoRA ranks --------------------------------------------------------------------------------
def best_rank_approximation(product: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_refactorising_a_pair_to_a_lower_or_higher_rank():
    from fedvlm.algorithms.lora_exact import fit_lora_ranks, refactorise_pair

    g = torch.Generator().manual_seed(5)
    b, a = torch.randn(12, 8, generator=g), torch.randn(8, 10, generator=g)  # a rank-8 global pair
    product = b.double() @ a.double()
    low_b, low_a = refactorise_pair(b, a, 4)  # lower: the best rank-4 approximation (Eckart-Young)
    assert low_b.shape == (12, 4) and low_a.shape == (4, 10) and low_b.dtype == torch.float32
    assert torch.allclose(low_b.double() @ low_a.double(), best_rank_approximation(product, 4), atol=1e-4)
    high_b, high_a = refactorise_pair(b, a, 10, torch.Generator().manual_seed(0))  # higher: B·A unchanged
    assert high_b.shape == (12, 10) and high_a.shape == (10, 10)
    assert torch.allclose(high_b.double() @ high_a.double(), product, atol=1e-4)
    assert torch.equal(high_b[:, 8:], torch.zeros(12, 2)) and high_a[8:].abs().min() > 0  # trainable padding
    # The initial adapter (B = 0): the product is zero at any rank, and every row of A is fresh seeded noise.
    zero_b, noise_a = refactorise_pair(torch.zeros(12, 8), a, 4, torch.Generator().manual_seed(0))
    assert torch.equal(zero_b, torch.zeros(12, 4)) and noise_a.abs().min() > 0
    again = refactorise_pair(torch.zeros(12, 8), a, 4, torch.Generator().manual_seed(0))[1]
    assert torch.equal(noise_a, again) and noise_a.abs().max() <= 10 ** -0.5
    # fit_lora_ranks touches only the pairs whose rank differs, and nothing else.
    tensors = {"m.lora_A.weight": a, "m.lora_B.weight": b, "n.lora_A.weight": low_a, "n.lora_B.weight": low_b,
               "head": t(1, 2)}
    fitted = fit_lora_ranks(tensors, {"m.lora_A.weight": 4, "n.lora_A.weight": 4}, seed=1)
    assert fitted["m.lora_A.weight"].shape == (4, 10)
    assert all(fitted[k] is tensors[k] for k in ("n.lora_A.weight", "n.lora_B.weight", "head"))


def test_exact_aggregation_of_a_rank_4_and_a_rank_8_site():
    g = torch.Generator().manual_seed(6)
    b4, a4 = torch.randn(12, 4, generator=g), torch.randn(4, 10, generator=g)
    b8, a8 = torch.randn(12, 8, generator=g), torch.randn(8, 10, generator=g)
    base = {"m.lora_A.weight": torch.zeros(8, 10), "m.lora_B.weight": torch.zeros(12, 8), "head": t(0, 0)}
    ups = updates_of((1, {"m.lora_A.weight": a4, "m.lora_B.weight": b4, "head": t(1, 1)}),
                     (3, {"m.lora_A.weight": a8, "m.lora_B.weight": b8, "head": t(5, 5)}))
    out = build(AlgorithmSpec(lora_exact=True)).aggregate(base, ups, {}, 1).tensors
    assert out["m.lora_A.weight"].shape == (8, 10) and out["m.lora_B.weight"].shape == (12, 8)  # the global's
    mean = (b4.double() @ a4.double() + 3 * b8.double() @ a8.double()) / 4  # rank up to 10: truncated to 8
    assert torch.allclose(out["m.lora_B.weight"].double() @ out["m.lora_A.weight"].double(),
                          best_rank_approximation(mean, 8), atol=1e-4)
    assert torch.allclose(out["head"], t(4, 4))


def test_rank_flexible_schema_checks_each_pair():
    from fedvlm.adapters import AdapterError, check_schema
    from fedvlm.algorithms.lora_exact import rank_flexible_schema

    glob = {"m.lora_A.weight": ((8, 10), "F32"), "m.lora_B.weight": ((12, 8), "F32"), "c.weight": ((3,), "F32")}
    update = {"m.lora_A.weight": ((2, 10), "F32"), "m.lora_B.weight": ((12, 2), "F32"), "c.weight": ((3,), "F32")}
    check_schema(update, rank_flexible_schema(update, glob))
    for bad, match in (({"m.lora_A.weight": ((2, 11), "F32")}, "expected shapes"),
                       ({"m.lora_B.weight": ((13, 2), "F32")}, "expected shapes"),
                       ({"m.lora_B.weight": ((12, 3), "F32")}, "ranks differ"),
                       ({"m.lora_A.weight": ((11, 10), "F32"), "m.lora_B.weight": ((12, 11), "F32")}, "outside")):
        with pytest.raises(AdapterError, match=match):
            rank_flexible_schema({**update, **bad}, glob)
    for bad in ({"c.weight": ((4,), "F32")}, {"m.lora_A.weight": ((2, 10), "F16")}):  # the rest stays exact
        with pytest.raises(AdapterError):
            check_schema({**update, **bad}, rank_flexible_schema({**update, **bad}, glob))
    half = {"m.lora_A.weight": ((2, 10), "F32")}  # half a pair of another rank: refused by the exact check
    with pytest.raises(AdapterError, match="shape mismatch"):
        check_schema(half, rank_flexible_schema(half, glob), allow_subset=True)


def test_a_site_local_lora_rank_needs_exact_aggregation():
    from fedvlm.learner import Learner

    with pytest.raises(ValueError, match="lora_exact"):  # refused before any data or model is loaded
        Learner(TaskSpec(), None, lora_rank=4)
    with pytest.raises(ValueError, match=">= 0"):
        Learner(TaskSpec(algorithm=AlgorithmSpec(lora_exact=True)), None, lora_rank=-1)
