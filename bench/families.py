"""Per Hugging Face VLM family: parameters, trainable parameters, update size, CPU step time, and what building a
batch costs (docs/models.md).

For each tiny checkpoint of ``fedvlm.vlm.zoo`` (and the built-in presets for reference): a Learner with F-CL on the
digits site 0, one torch thread, batch 4. ``encode_ms``: the first encoding of one example by the model's processor
(image decode, chat template, tokenizer), the mean over the training set (done once per dataset by
``Learner.prepare_batches``). ``collate_ms``: building one batch of 4 from cached encodings (pad + concatenate),
median of 50. ``step_ms``: the median over 3 rounds of ``--steps`` optimizer steps of ``train_round`` (forward,
backward, clip, AdamW; batches prepared ahead), per step. ``collate_share`` = collate_ms / step_ms.

    python bench/families.py [--steps 10] [--json PATH] [--only FAMILY ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_info


def measure(model: str, data: Path, steps: int) -> dict:
    from fedvlm import adapters
    from fedvlm.learner import Learner
    from fedvlm.spec import TaskSpec, TrainSpec

    learner = Learner(TaskSpec(model=model, train=TrainSpec(batch_size=4, max_steps=steps)), data)
    examples = learner._examples["train"]
    started = time.perf_counter()
    learner.prepare_batches()
    encode_ms = 1000 * (time.perf_counter() - started) / len(examples)
    collate = []
    for i in range(50):
        batch_examples = [examples[(4 * i + j) % len(examples)] for j in range(4)]
        started = time.perf_counter()
        learner.batches.training(batch_examples)
        collate.append(time.perf_counter() - started)
    rounds = [learner.train_round(r) for r in (1, 2, 3)]
    step_ms = 1000 * statistics.median(r.seconds / r.steps for r in rounds)
    collate_ms = 1000 * statistics.median(collate)
    base = learner.model.get_base_model()
    return {
        "model": model, "family": base.config.model_type,
        "params": sum(p.numel() for p in base.parameters()),
        "trainable": sum(p.numel() for p in learner.model.parameters() if p.requires_grad),
        "update_bytes": len(adapters.to_bytes(learner.adapter_state(1))),
        "encode_ms": round(encode_ms, 2), "collate_ms": round(collate_ms, 3), "step_ms": round(step_ms, 1),
        "collate_share": round(collate_ms / step_ms, 4),
        "loss_first": round(rounds[0].loss_first, 3), "loss_last": round(rounds[-1].loss_last, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", nargs="*", help="families (zoo names) or preset names to measure")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from fedvlm.data.digits import build_digits
    from fedvlm.vlm import zoo

    root = Path(tempfile.mkdtemp(prefix="fedvlm-bench-families-"))
    build_digits(root / "digits")
    targets = {f"hf:{root / family}": family for family in zoo.ZOO}
    targets |= {name: name for name in ("tiny-llava", "tiny-encoder-free")}
    rows = []
    for model, name in targets.items():
        if args.only and name not in args.only:
            continue
        if model.startswith("hf:"):
            zoo.build(name, root / name)
        row = measure(model, root / "digits" / "site_0", args.steps)
        row["model"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| family | params | trainable (F-CL) | update | step (ms, batch 4) | encode / example (ms, once) "
          "| collate / step (ms) | collate share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['model']}` | {r['params']:,} | {r['trainable']:,} | {r['update_bytes'] / 1024:.1f} KiB | "
              f"{r['step_ms']:.0f} | {r['encode_ms']:.1f} | {r['collate_ms']:.2f} | {100 * r['collate_share']:.1f} % |")
    result = {"machine": machine_info(), "batch_size": 4, "threads": 1, "steps": args.steps, "rows": rows}
    out = args.json or root / "families.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
