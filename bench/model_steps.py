"""Per-step training time and update size of every tiny preset and strategy (docs/models.md).

For each (preset, strategy): a Learner on the digits site 0 (FEDVLM_CACHE presets), one torch thread, batch 4.
Step time: the median of ``--steps`` timed optimizer steps (forward + backward + clip + AdamW) after 2 warm-up steps,
measured with ``train_local`` itself (``max_steps``), divided by the step count. Update size: the bytes of
``adapters.to_bytes(learner.adapter_state(round))`` (safetensors) for round 1, and for F-2stage also for the round
after the switch (the LoRA stage); the initial upload (all tensors) is listed as ``init``.

    python bench/model_steps.py [--steps 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

STRATEGIES = ("F-C", "F-L", "F-CL", "F-2stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from fedvlm import adapters
    from fedvlm.data.digits import build_digits
    from fedvlm.learner import Learner
    from fedvlm.spec import TaskSpec, TrainSpec
    from fedvlm.vlm.presets import TINY_PRESETS, parameter_counts

    data = Path(tempfile.mkdtemp(prefix="fedvlm-bench-")) / "digits"
    build_digits(data)
    rows = []
    for preset in TINY_PRESETS:
        for strategy in STRATEGIES:
            switch = 2 if strategy == "F-2stage" else 0
            spec = TaskSpec(model=preset, strategy=strategy, switch_round=switch,
                            train=TrainSpec(batch_size=4, max_steps=2))
            learner = Learner(spec, data / "site_0")
            learner.train_round(1)  # warm-up
            times = []
            for _ in range(3):
                learner.spec = TaskSpec(model=preset, strategy=strategy, switch_round=switch,
                                        train=TrainSpec(batch_size=4, max_steps=args.steps))
                started = time.perf_counter()
                learner.train_round(1)
                times.append((time.perf_counter() - started) / args.steps)
            row = {
                "preset": preset, "strategy": strategy, "params": parameter_counts(preset)["total"],
                "step_ms": round(1000 * sorted(times)[1], 1),
                "trainable": sum(p.numel() for p in learner.model.parameters() if p.requires_grad),
                "init_bytes": len(adapters.to_bytes(learner.adapter_state())),
                "update_bytes": len(adapters.to_bytes(learner.adapter_state(1))),
            }
            if switch:
                row["update_bytes_stage2"] = len(adapters.to_bytes(learner.adapter_state(switch)))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "batch_size": 4, "threads": 1, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
