"""The site-GPU recipe (docs/models.md): [task.train] precision, gradient checkpointing, gradient accumulation,
learning-rate schedule, [task] quantization, and the refusals a site without the hardware or packages gets."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fedvlm import adapters
from fedvlm.learner import Learner
from fedvlm.recipe import SiteSetupError, learning_rate
from fedvlm.spec import LoraSpec, SpecError, TaskSpec, TrainSpec

NO_DROPOUT = LoraSpec(dropout=0.0)  # equal updates from differently shaped batches need equal (no) dropout masks


def spec(quantization: str = "none", lora: LoraSpec = NO_DROPOUT, **train) -> TaskSpec:
    return TaskSpec(quantization=quantization, lora=lora, train=TrainSpec(**{"batch_size": 8, **train}))


def trained(digits, round_index: int = 1, **kwargs) -> tuple[Learner, object]:
    learner = Learner(spec(**kwargs), digits / "site_0")
    return learner, learner.train_round(round_index, total_rounds=3)


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max difference {worst:.3g} > {atol:g}"


@pytest.mark.parametrize(("key", "value"), [
    ("train.precision", "fp8"), ("train.gradient_checkpointing", "yes"), ("train.grad_accum_steps", 0),
    ("train.grad_accum_steps", True), ("train.lr_schedule", "linear"), ("train.warmup_steps", -1),
    ("quantization", "q4"),
])
def test_recipe_keys_are_validated_at_load_and_the_error_names_the_key(key, value):
    table: dict = {}
    if key.startswith("train."):
        table["train"] = {key.split(".", 1)[1]: value}
    else:
        table[key] = value
    with pytest.raises(SpecError, match="^" + re.escape(f"task.{key}: ")):
        TaskSpec.from_dict(table)


def test_recipe_keys_travel_in_the_task_json():
    original = TaskSpec.from_dict({"quantization": "nf4", "train": {
        "precision": "bf16", "gradient_checkpointing": True, "grad_accum_steps": 4, "lr_schedule": "cosine",
        "warmup_steps": 10}})
    assert TaskSpec.from_json(original.to_json()) == original


def test_cosine_schedule_spans_the_whole_run_as_a_pure_function_of_the_position():
    train = TrainSpec(lr=1e-3, lr_schedule="cosine")
    steps, rounds = 10, 4

    def lr(round_index: int, step: int) -> float:
        return learning_rate(train, round_index, rounds, step, steps)

    assert lr(1, 1) == pytest.approx(1e-3)  # no warm-up: the run starts at the peak
    assert lr(3, 1) == pytest.approx(0.5e-3)  # half-way through the run's 40 steps: cos(pi/2)
    assert lr(2, 1) == pytest.approx(1e-3 * (1 + math.cos(math.pi * 10 / 40)) / 2)
    assert 0 < lr(4, 10) < 1e-5  # the last step of the last round: nearly zero, never zero
    trace = [lr(r, s) for r in range(1, rounds + 1) for s in range(1, steps + 1)]
    assert all(a > b for a, b in zip(trace, trace[1:], strict=False))  # decreasing across round boundaries
    with pytest.raises(ValueError, match="outside the run's rounds 1..4"):
        lr(5, 1)


def test_warmup_is_linear_then_the_schedule_takes_over():
    cosine = TrainSpec(lr=1e-3, lr_schedule="cosine", warmup_steps=5)
    values = [learning_rate(cosine, 1, 2, step, 10) for step in range(1, 8)]
    assert values[:6] == pytest.approx([1e-3 * k / 6 for k in range(1, 7)])  # 5 steps up, the 6th at the peak
    assert values[6] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 15)) / 2)  # 1 of the 15 decay steps
    constant = TrainSpec(lr=1e-3, warmup_steps=3)
    assert [learning_rate(constant, r, 0, s, 2) for r, s in ((1, 1), (1, 2), (2, 1), (2, 2))] == \
        pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # warm-up continues into round 2; no round count needed
    assert learning_rate(TrainSpec(lr=1e-3), 0, 0, 1, 3) == 1e-3  # the plain constant schedule needs no position


def test_a_cosine_round_trains_with_the_scheduled_rates(digits):
    """The schedule is what the optimizer used: with a cosine over 3 rounds the round-3 update is far smaller
    than the round-1 update of the same (constant) start."""
    moves = {}
    for round_index in (1, 3):
        learner = Learner(spec(max_steps=4, lr_schedule="cosine"), digits / "site_0")
        before = learner.adapter_state()
        learner.train_round(round_index, total_rounds=3)
        after = learner.adapter_state()
        moves[round_index] = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moves[3] < 0.3 * moves[1]


@pytest.fixture(scope="module")
def long_answers(digits, tmp_path_factory) -> Path:
    """Digit images whose answers repeat the digit 1 to 6 times: micro-batches then differ in answer tokens, so a
    mean of per-micro-batch means would differ from the mean over all tokens."""
    out = tmp_path_factory.mktemp("long-answers")
    (out / "images").mkdir()
    records = json.loads((digits / "site_0" / "train.json").read_text())[:48]
    for index, record in enumerate(records):
        shutil.copy(digits / "site_0" / record["image"], out / record["image"])
        digit = record["conversations"][1]["value"]
        record["conversations"][1]["value"] = " ".join([digit] * (1 + index % 6))
    (out / "train.json").write_text(json.dumps(records))
    return out


def test_grad_accumulation_equals_one_big_batch(fedvlm_cache, long_answers):
    """2 x batch 4 equals 1 x batch 8: the loss is a mean over the effective batch's answer tokens, not a mean of
    per-micro-batch means. Tolerance: float32 sums in another order and another padding width, ~1e-7 relative in
    the gradients; after 3 AdamW steps at lr 1e-3 the adapters agree to 1e-5 (1% of one step), while a mean of
    micro-batch means already moves the first step's loss by ~1e-2."""
    results = {}
    for batch_size, accum in ((8, 1), (4, 2), (2, 4)):
        learner = Learner(spec(max_steps=3, batch_size=batch_size, grad_accum_steps=accum), long_answers)
        results[batch_size] = (learner.train_round(1), learner.adapter_state(1))
    (big, big_state), (small, small_state), (tiny, tiny_state) = results[8], results[4], results[2]
    assert small.steps == big.steps == tiny.steps == 3
    assert small.loss_first == pytest.approx(big.loss_first, rel=1e-5)
    assert tiny.loss_first == pytest.approx(big.loss_first, rel=1e-5)
    assert_close(small_state, big_state, atol=1e-5)
    assert_close(tiny_state, big_state, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_losses_and_update(fedvlm_cache, digits):
    """Checkpointing recomputes activations in backward with the RNG state restored: with LoRA dropout on, the
    losses and the update equal those without it (up to float rounding)."""
    with_dropout = LoraSpec(dropout=0.1)
    plain, plain_result = trained(digits, max_steps=3, lora=with_dropout)
    checkpointed, ckpt_result = trained(digits, max_steps=3, lora=with_dropout, gradient_checkpointing=True)
    assert checkpointed.model.get_base_model().is_activation_checkpointing
    assert ckpt_result.loss_first == pytest.approx(plain_result.loss_first, rel=1e-6)
    assert ckpt_result.loss_last == pytest.approx(plain_result.loss_last, rel=1e-6)
    assert_close(checkpointed.adapter_state(1), plain.adapter_state(1), atol=1e-6)


def test_bf16_trains_the_float32_adapter_on_a_bf16_base(fedvlm_cache, digits):
    learner, result = trained(digits, max_steps=20, precision="bf16")
    assert result.loss_last < result.loss_first
    trainable = [p for p in learner.model.parameters() if p.requires_grad]
    frozen = [p for p in learner.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # the frozen base takes half the memory
    fp32 = Learner(spec(), None)
    assert adapters.schema_of(learner.adapter_state(1)) == adapters.schema_of(fp32.adapter_state(1))
    assert learner.evaluate()["num_examples"] > 0  # generation runs under the same autocast


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_lora_and_the_update_is_the_fp32_one(fedvlm_cache, digits, quantization):
    """QLoRA: the base's linear layers are bitsandbytes layers, LoRA and the connector stay float32, and the
    update has the names, shapes and dtypes of an unquantized site's, so either loads the other's global."""
    import bitsandbytes as bnb

    quantized, result = trained(digits, max_steps=12, quantization=quantization)
    assert result.loss_last < result.loss_first
    layer = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer) for m in quantized.model.modules())
    assert all(p.dtype == torch.float32 for p in quantized.model.parameters() if p.requires_grad)
    plain = Learner(spec(), digits / "site_0")
    update = quantized.adapter_state(1)
    assert adapters.schema_of(update) == adapters.schema_of(plain.adapter_state(1))
    plain.load_global_state(update, 2)  # a quantized site's update joins an unquantized site's run
    quantized.load_global_state(plain.adapter_state(), 2)  # and back
    assert quantized.base_model_digest() == plain.base_model_digest()  # quantized at load from the same files


def test_fp16_without_a_gpu_is_refused_before_anything_is_built(tmp_path, digits):
    cache = tmp_path / "cache"
    with pytest.raises(SiteSetupError, match=r'^task\.train\.precision = "fp16" needs a CUDA GPU and this site '
                                             r'trains on cpu: use "bf16" or "fp32"'):
        Learner(spec(precision="fp16"), digits / "site_0", device="cpu", cache_dir=cache)
    assert not cache.exists()  # no preset built, nothing loaded


def test_quantization_without_bitsandbytes_is_refused_in_one_line(tmp_path, digits, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets where it is absent
    cache = tmp_path / "cache"
    with pytest.raises(SiteSetupError, match=r"""^task\.quantization = "nf4" needs bitsandbytes on this site: """
                                             r"""pip install 'fedvlm\[qlora\]'$"""):
        Learner(spec(quantization="nf4"), digits / "site_0", cache_dir=cache)
    assert not cache.exists()


@pytest.mark.slow
def test_a_cpu_site_given_an_fp16_run_exits_with_one_line(tmp_path, fedvlm_cache, digits):
    """Through the real agent: the site that is asked to build the initial adapter stops with the reason."""
    from .harness import Coordinator, start_site, wait_for

    coord = Coordinator(tmp_path / "coord", """
name = "fp16"
[run]
rounds = 1
min_clients = 1
clients_per_round = 1
quorum = 1
poll_interval = 0.2
[task.train]
precision = "fp16"
""")
    coord.start()
    try:
        site = start_site(coord, "site-1", digits / "site_0", tmp_path, fedvlm_cache)
        wait_for(lambda: site.poll() is not None, 120, "the site to exit")
    finally:
        coord.kill()
    assert site.returncode == 1
    last = (tmp_path / "site-1.log").read_text().strip().splitlines()[-1]
    assert last == ('error: cannot train this run here: task.train.precision = "fp16" needs a CUDA GPU and this '
                    'site trains on cpu: use "bf16" or "fp32" for runs with CPU sites')
