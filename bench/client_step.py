"""Client step: fedvlm's local training step against a plain PyTorch + PEFT loop on the same model and batch.

One `Learner` (the site's model: `--model` preset, F-CL, LoRA on the language model + the connector) on a site of
the built-in digits, batches prepared ahead by `Learner.prepare_batches` (as every round does). Product: one
`Learner.train_round` of `--steps` steps (fedvlm.train.train_local: schedule, per-step batch from the encode cache,
loss-token count, the algorithm's hook, clipping, AdamW); a step's time is the interval between two `progress`
calls, so the round's setup (schedule, optimizer) is not in it. Baseline, on the same PEFT model: one batch built
once (`learner.batches.training` of the first `batch_size` examples), then `zero_grad`, forward with labels,
`backward`, `clip_grad_norm_`, `AdamW.step` in a bare loop. Blocks of product and baseline alternate `--repeats`
times; reported: median step times and the ratio baseline / product (1.0 = as fast as the bare loop; target >= 0.95).

    python bench/client_step.py [--model tiny-llava] [--steps 30] [--repeats 3] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from machine import machine_info  # bench/machine.py (scripts run from bench/)

TARGET_RATIO = 0.95


def product_steps(learner, steps: int, round_index: int) -> list[float]:
    stamps: list[float] = []
    learner.spec = replace(learner.spec, train=replace(learner.spec.train, max_steps=steps + 1))
    learner.train_round(round_index, progress=lambda step, total: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def baseline_steps(learner, steps: int) -> list[float]:
    import torch

    model = learner.model
    batch = learner.batches.training(learner._examples["train"][:learner.spec.train.batch_size])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learner.spec.train.lr)
    model.train()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    model.eval()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "fedvlm-bench" / "client_step.json")
    args = parser.parse_args()
    import torch

    from fedvlm.data.digits import build_digits
    from fedvlm.learner import Learner
    from fedvlm.spec import TaskSpec

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="fedvlm-step-"))
    site = build_digits(work / "digits", sites=3).site_dirs[0]
    learner = Learner(TaskSpec(model=args.model, strategy="F-CL"), site)
    torch.set_num_threads(args.threads)
    learner.prepare_batches()
    product, baseline = [], []
    for repeat in range(args.repeats):
        product += product_steps(learner, args.steps, repeat + 1)
        baseline += baseline_steps(learner, args.steps)
    p, b = statistics.median(product), statistics.median(baseline)
    print(f"model {args.model}, batch {learner.spec.train.batch_size}, torch threads {torch.get_num_threads()}, "
          f"{len(product)} product / {len(baseline)} baseline steps")
    print(f"fedvlm step   {p * 1000:7.2f} ms (median)")
    print(f"plain loop    {b * 1000:7.2f} ms (median)")
    ratio = b / p
    print(f"ratio plain / fedvlm: {ratio:.3f} ({'meets' if ratio >= TARGET_RATIO else 'misses'} the "
          f"{TARGET_RATIO} target)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_info(), "model": args.model, "product_ms": p * 1000,
                                     "baseline_ms": b * 1000, "ratio": ratio, "product_steps_s": product,
                                     "baseline_steps_s": baseline}, indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
