"""The machine facts every benchmark report starts with (benchmarks compare ratios; these say where they ran)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine_info() -> dict:
    """Cores, CPU model, memory, kernel and the versions of the packages on the measured paths."""
    import grpc
    import safetensors
    import torch

    meminfo = Path("/proc/meminfo").read_text().splitlines()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    mem_kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal"))
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kb / (1 << 20), 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "grpcio": grpc.__version__, "safetensors": safetensors.__version__,
            "torch_threads": torch.get_num_threads()}
