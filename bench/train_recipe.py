"""Peak memory and step time of the site-GPU recipe (docs/models.md, "site-GPU recipe") on a ~0.1 B-parameter VLM.

The model: a LLaVA whose language model has SmolLM2-135M's decoder shape (Llama, 30 layers, hidden 576, 9 heads /
3 KV heads, MLP 1536; fedvlm's 320-token offline vocabulary instead of 49,152, so 107 M LM parameters instead of
135 M) behind a 4-layer CLIP tower on 64 px images (64 image tokens), random weights, built offline once (a preset
registered here, cached under FEDVLM_CACHE). Each configuration runs in its own process (so peaks do not mix):
F-CL (LoRA r8 on every LM linear layer + the connector), digits site 0, batch 4, one warm-up step, then ``--steps``
timed steps (``train_local`` itself). Memory: the bytes of the model's parameters and buffers as loaded (4-bit
weights count as their packed bytes), and the peak of the timed steps: on CPU the resident set (RSS, sampled every
5 ms) above the process's RSS before the model loaded, on a GPU ``torch.cuda.max_memory_allocated``.

On a machine with a CUDA GPU it also runs what only a GPU can show: fp16 with the loss scaler, the same matrix on
the GPU, and ``--nproc 2`` over NCCL (two GPUs needed) against one process; without a GPU it says so.

    python bench/train_recipe.py [--steps 3] [--threads 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PRESET = "bench-llava-smollm2-shape"
CPU_CONFIGS = [(precision, quantization, checkpointing) for precision, quantization in
               (("fp32", "none"), ("bf16", "none"), ("bf16", "nf4")) for checkpointing in (False, True)]
GPU_CONFIGS = CPU_CONFIGS + [("fp16", "none", False), ("fp16", "none", True)]


def register_preset() -> None:
    from fedvlm.vlm.presets import PRESETS, TinyLlavaPreset

    PRESETS[PRESET] = TinyLlavaPreset(
        image_size=64, patch_size=8, vision_hidden=256, vision_intermediate=1024, vision_layers=4, vision_heads=4,
        text_hidden=576, text_intermediate=1536, text_layers=30, text_heads=9, text_kv_heads=3, max_positions=512,
        text_init_std=0.02, connector="mlp2x_gelu")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """The largest RSS seen while the block runs (sampled every 5 ms by a thread)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measure(config: dict) -> dict:
    """One configuration, in this (child) process."""
    import torch

    torch.set_num_threads(config["threads"])
    from fedvlm.learner import Learner
    from fedvlm.spec import TaskSpec, TrainSpec

    device = config["device"]
    cuda = device.startswith("cuda")

    def spec(steps: int) -> TaskSpec:
        return TaskSpec(model=f"hf:{config['model_dir']}", quantization=config["quantization"],
                        train=TrainSpec(batch_size=4, max_steps=steps, precision=config["precision"],
                                        gradient_checkpointing=config["checkpointing"]))

    baseline = rss_bytes()
    started = time.perf_counter()
    learner = Learner(spec(1), Path(config["data"]), device=device)
    load_s = time.perf_counter() - started
    learner.train_round(1)  # warm-up: allocator, autocast caches, bitsandbytes kernels
    learner.spec = spec(config["steps"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRss() as peak:
        started = time.perf_counter()
        result = learner.train_round(1)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    row = {**{k: config[k] for k in ("device", "precision", "quantization", "checkpointing")},
           "params": sum(p.numel() for p in learner.model.parameters()),
           "trainable": sum(p.numel() for p in learner.model.parameters() if p.requires_grad),
           "weights_mib": round(sum(t.numel() * t.element_size() for t in
                                    [*learner.model.parameters(), *learner.model.buffers()]) / 2**20),
           "load_s": round(load_s, 1), "step_s": round(seconds / result.steps, 3),
           "loss": round(result.loss_last, 3)}
    if cuda:
        row["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    else:
        row["train_peak_rss_mib"] = round((peak.peak - baseline) / 2**20)
    return row


def run_child(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return {**config, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def nccl_check(data: Path) -> str:
    """--nproc 2 over NCCL against one process on the tiny preset (the CPU/gloo twin is a test)."""
    import torch

    from fedvlm import adapters
    from fedvlm.client.parallel import SiteWorkers
    from fedvlm.learner import Learner
    from fedvlm.spec import LoraSpec, TaskSpec, TrainSpec

    if torch.cuda.device_count() < 2:
        return f"skipped: --nproc 2 over NCCL needs 2 GPUs, {torch.cuda.device_count()} visible"
    spec = TaskSpec(lora=LoraSpec(dropout=0.0), train=TrainSpec(batch_size=4, grad_accum_steps=2, max_steps=4))
    single = Learner(spec, data, device="cuda:0")
    start = single.adapter_state()
    expected = single.federated_round(start, 1, 1).update
    workers = SiteWorkers(2, "cuda", data, None, torch.get_num_threads())
    workers.start()
    try:
        rank0 = Learner(spec, data, device="cuda:0")
        workers.start_round((spec.to_json(), 0), adapters.to_bytes(start), 1, 1, {})
        got = rank0.federated_round(start, 1, 1, group=workers.group).update
    finally:
        workers.close()
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    return f"--nproc 2 (NCCL) vs one process: max |difference| {worst:.2e} over {len(expected)} tensors"


def table(rows: list[dict]) -> str:
    cuda = any(r.get("device", "").startswith("cuda") for r in rows)
    memory = ["weights (MiB)", "GPU peak (MiB)" if cuda else "training peak RSS (MiB)"]
    head = ["device", "precision", "quantization", "checkpointing", "step (s)", *memory, "load (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['precision']} | {r['quantization']} | {r['checkpointing']} | "
                         f"error: {r['error']} |")
            continue
        mem = [str(r["weights_mib"]), str(r["gpu_peak_mib"] if cuda else r["train_peak_rss_mib"])]
        lines.append(f"| {r['device']} | {r['precision']} | {r['quantization']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['step_s']} | {' | '.join(mem)} | {r['load_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return

    import torch

    from fedvlm.data.digits import build_digits
    from fedvlm.vlm.presets import parameter_counts, preset_dir

    register_preset()
    model_dir = preset_dir(PRESET)
    data = Path(tempfile.mkdtemp(prefix="fedvlm-bench-")) / "digits"
    build_digits(data)
    counts = parameter_counts(PRESET)
    print(f"model: {counts['total'] / 1e6:.1f} M parameters ({counts['language_model'] / 1e6:.1f} M LM, "
          f"{counts['vision'] / 1e6:.1f} M vision, {counts['connector'] / 1e6:.2f} M connector) at {model_dir}",
          flush=True)
    base = {"model_dir": str(model_dir), "data": str(data / "site_0"), "steps": args.steps, "threads": args.threads}
    rows = []
    devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    for device in devices:
        for precision, quantization, checkpointing in (GPU_CONFIGS if device != "cpu" else CPU_CONFIGS):
            row = run_child({**base, "device": device, "precision": precision, "quantization": quantization,
                             "checkpointing": checkpointing})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if torch.cuda.is_available():
        gpu = f"GPU: {torch.cuda.get_device_name(0)}; " + nccl_check(data / "site_0")
    else:
        gpu = ("no CUDA GPU here: the GPU-only checks (fp16 with the loss scaler, GPU memory, --nproc over NCCL) "
               "did not run")
    print(gpu, flush=True)
    print(table(rows))
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "load_average": os.getloadavg()},
              "model": counts, "steps": args.steps, "threads": args.threads, "rows": rows, "gpu": gpu}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
