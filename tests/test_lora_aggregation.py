"""LoRA aggregation methods (task.algorithm.lora_aggregation): FFA-LoRA and RoLoRA send one factor and average
exactly, FLoRA stacks heterogeneous ranks exactly, merges the stack into the sites' base and exports a PEFT
adapter that loads on the unmerged base; the old lora_exact key still means "exact"."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText

from fedvlm import adapters
from fedvlm.algorithms import algorithm_config, build
from fedvlm.algorithms.base import ClientUpdate, next_global, split_aux
from fedvlm.algorithms.lora_aggregation import export_tensors, trained_factors
from fedvlm.learner import Learner
from fedvlm.spec import SpecError, TaskSpec, TrainSpec

from .test_vlm_strategies import small_sites  # noqa: F401 - the session fixture of two small digit sites

A, B = "m.lora_A.weight", "m.lora_B.weight"


def updates(*pairs) -> list[ClientUpdate]:
    return [ClientUpdate(float(n), lambda t=t: (dict(t), {})) for n, t in pairs]


def test_which_factors_a_round_trains():
    assert trained_factors("ffa", 1) == trained_factors("ffa", 6) == {"B"}
    assert [sorted(trained_factors("rolora", r)) for r in (1, 2, 3, 4)] == [["B"], ["A"], ["B"], ["A"]]
    for method in ("factors", "exact", "flora"):
        assert trained_factors(method, 3) == {"A", "B"}
    assert trained_factors("ffa", 0) == trained_factors("rolora", None) == {"A", "B"}  # the initial adapter


def test_one_factor_averages_exactly():
    g = torch.Generator().manual_seed(0)
    a0 = torch.randn(2, 6, generator=g)
    base = {A: a0, B: torch.zeros(5, 2)}
    b1, b2 = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    result = build(algorithm_config(lora_aggregation="ffa")).aggregate(base, updates((3, {B: b1}), (1, {B: b2})),
                                                                        {}, 1)
    merged = next_global(base, result)
    assert torch.equal(merged[A], a0)  # A is never sent: it keeps its shared initialisation
    assert torch.allclose(merged[B] @ merged[A], (3 * b1 @ a0 + b2 @ a0) / 4, atol=1e-6)


def test_flora_stacks_heterogeneous_ranks_exactly_and_keeps_the_initial_lora():
    g = torch.Generator().manual_seed(1)
    base = {A: torch.randn(4, 10, generator=g), B: torch.zeros(9, 4), "head": torch.zeros(3)}
    algorithm = build(algorithm_config(lora_aggregation="flora"))
    pairs = [(torch.randn(9, r, generator=g), torch.randn(r, 10, generator=g)) for r in (2, 4, 1)]
    ups = updates(*[(n, {A: a, B: b, "head": torch.full((3,), float(n))}) for n, (b, a) in zip((1, 2, 1), pairs,
                                                                                              strict=True)])
    r1 = algorithm.aggregate(base, ups, algorithm.initial_state(base), 1)
    g1 = next_global(base, r1)
    _, aux = split_aux(g1)
    target = sum(n * b @ a for n, (b, a) in zip((1, 2, 1), pairs, strict=True)) / 4
    assert aux["flora.B/" + B].shape == (9, 7) and aux["flora.A/" + A].shape == (7, 10)  # rank 2 + 4 + 1
    assert torch.allclose(aux["flora.B/" + B] @ aux["flora.A/" + A], target, atol=1e-5)
    assert torch.equal(g1[A], base[A]) and torch.equal(g1[B], base[B])
    assert torch.allclose(g1["head"], torch.full((3,), 1.5))
    r2 = algorithm.aggregate(split_aux(g1)[0], ups, r1.state, 2)  # rank 14 > min(9, 10): re-factorised exactly
    _, aux2 = split_aux(next_global(base, r2))
    assert aux2["flora.A/" + A].shape[0] == 9
    assert torch.allclose(aux2["flora.B/" + B] @ aux2["flora.A/" + A], 2 * target, atol=1e-4)


@pytest.mark.parametrize(("raw", "key"), [
    ({"lora_aggregation": "fedit"}, "task.algorithm.lora_aggregation"),
    ({"lora_exact": True, "lora_aggregation": "ffa"}, "task.algorithm.lora_exact"),
    ({"name": "fedadam", "lora_aggregation": "flora"}, "task.algorithm.lora_aggregation"),
    ({"lora_aggregation": "flora", "aggregator": "median"}, "task.algorithm.lora_aggregation"),
    ({"lora_aggregation": "exact", "clip_norm": 1.0}, "task.algorithm.lora_aggregation"),
])
def test_lora_aggregation_is_validated_at_load(raw, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        TaskSpec.from_dict({"algorithm": raw})


def test_lora_exact_true_is_lora_aggregation_exact():
    old = TaskSpec.from_dict({"algorithm": {"lora_exact": True}})
    new = TaskSpec.from_dict({"algorithm": {"lora_aggregation": "exact"}})
    assert old == new and old.algorithm.lora_aggregation == "exact" and new.algorithm.lora_exact
    assert TaskSpec.from_json(old.to_json()) == old
    assert [TaskSpec.from_dict({"algorithm": {"lora_aggregation": m}}).algorithm.heterogeneous_ranks
            for m in ("factors", "exact", "ffa", "rolora", "flora")] == [False, True, False, False, True]
    assert build(algorithm_config(lora_aggregation="rolora", name="fedadam")).config.name == "fedadam"


def spec(method: str) -> TaskSpec:
    return TaskSpec(strategy="F-L", train=TrainSpec(max_steps=2, batch_size=4),
                    algorithm=algorithm_config(lora_aggregation=method))


def test_ffa_and_rolora_sites_train_and_send_one_factor_that_intake_accepts(small_sites):  # noqa: F811
    for method, rounds in (("ffa", {1: "lora_B", 2: "lora_B"}), ("rolora", {1: "lora_B", 2: "lora_A"})):
        learner = Learner(spec(method), small_sites[0])
        global0 = learner.adapter_state()
        schema = adapters.schema_of(global0)
        for number, factor in rounds.items():
            step = learner.federated_round(global0, number, 2)
            assert step.update and all(f".{factor}." in k for k in step.update), (method, number)
            frozen = "lora_A" if factor == "lora_B" else "lora_B"
            assert not any(p.requires_grad for n, p in learner.model.named_parameters() if f".{frozen}." in n)
            adapters.check_schema(adapters.schema_of(step.update), schema, allow_subset=True)  # intake's check
            assert 2 * len(step.update) == len(global0)  # half of the LoRA tensors go up


def test_flora_sites_merge_the_stack_and_the_export_loads_on_the_unmerged_base(small_sites, tmp_path):  # noqa: F811
    sites = [Learner(spec("flora"), small_sites[0]), Learner(spec("flora"), small_sites[1], lora_rank=4)]
    global0 = sites[0].adapter_state()
    algorithm = build(sites[0].spec.algorithm)
    ups = []
    for learner in sites:
        step = learner.federated_round(global0, 1, 2)
        ups.append(ClientUpdate(float(step.result.num_examples), lambda s=step: (s.update, s.aux)))
    global1 = next_global(global0, algorithm.aggregate(global0, ups, algorithm.initial_state(global0), 1))
    _, stack = split_aux(global1)
    assert {v.shape[0] for k, v in stack.items() if k.startswith("flora.A/")} == {8 + 4}  # ranks 8 and 4 stacked

    evaluator = sites[0]
    evaluator.load_global_state(global1, 2)
    name = next(k for k in stack if k.startswith("flora.B/"))[len("flora.B/"):]
    module = evaluator.model.get_submodule(name.removesuffix(".lora_B.weight"))
    scaling = module.scaling["default"]
    a_name = name.replace("lora_B", "lora_A")
    merged = module.base_layer.weight.detach().clone()
    original = evaluator._unmerged[name.removeprefix("base_model.model.").removesuffix(".lora_B.weight")]
    assert torch.allclose(merged, original + scaling * stack["flora.B/" + name] @ stack["flora.A/" + a_name],
                          atol=1e-6)
    assert torch.equal(evaluator.adapter_state()[name], global0[name])  # the LoRA restarted from its init (B = 0)
    evaluator.load_global_state(global0, 1)
    assert torch.equal(module.base_layer.weight, original)  # a global without a stack: the base is W0 again

    tensors, config = export_tensors(split_aux(global1)[0], stack, evaluator.adapter_config())
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    base = AutoModelForImageTextToText.from_pretrained(evaluator.base_model_path)
    exported = PeftModel.from_pretrained(base, tmp_path).merge_and_unload()
    path = name.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    assert torch.allclose(exported.get_submodule(path).weight, merged, atol=1e-5)


def test_bench_site_lora_ranks_per_method():
    from fedvlm.study.config import BenchConfig

    def config(method: str, ranks=(4, 8, 16)) -> BenchConfig:
        return BenchConfig.from_dict({"task": {"lora": {"r": 16, "alpha": 32},
                                               "algorithm": {"lora_aggregation": method}},
                                      "experiment": {"num_clients": 4, "site_lora_ranks": list(ranks)}})

    names = ["s1", "s2", "s3", "s4"]
    assert config("flora").site_ranks(names) == {"s1": 4, "s2": 8, "s3": 16, "s4": 4}
    assert config("exact").for_seed(1).lora.r == 16
    equal = config("ffa")
    assert equal.site_ranks(names) == dict.fromkeys(names, 4)  # one rank: the smallest every site can afford
    assert (equal.for_seed(1).lora.r, equal.for_seed(1).lora.alpha) == (4, 8)  # alpha / r kept
    with pytest.raises(SpecError, match=r"experiment\.site_lora_ranks"):
        config("flora", ranks=(4, 0))
