"""A site's data-parallel worker processes (``fedvlm-client --nproc N``): ranks 1..N-1, each with its own resident
model, training every round alongside rank 0 (the agent's process); only rank 0 talks to the coordinator.

Rank 0 sends each worker one command per round through a queue: the run's spec and LoRA rank, the verified global
as safetensors bytes, the round, the run's round count and the algorithm's client state. Every rank then runs the
same ``Learner.federated_round`` in one torch.distributed group (gloo on CPUs, NCCL on GPUs), whose gradient sums
make the N processes take exactly the steps one process would (fedvlm.data_parallel); rank 0 alone signs and
uploads the result. Between rounds a worker blocks on its queue, not in a collective, so a long wait for the next
round cannot time out, and its model stays built until the spec changes.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
from pathlib import Path

import torch

from fedvlm import adapters
from fedvlm.data_parallel import DataParallel

log = logging.getLogger(__name__)

# A collective waits at most this long for the other ranks (a step of the slowest rank, or a rank that died).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class WorkerError(RuntimeError):
    """A data-parallel worker exited: the site cannot train the round."""


def available_devices(device: str) -> int:
    """How many processes ``--nproc`` may start on ``device``'s kind: the visible GPUs for cuda, the CPU cores
    this process may run on for cpu."""
    if torch.device(device).type == "cuda":
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_nproc(nproc: int, device: str) -> None:
    """``ValueError`` (one line) unless ``nproc`` processes can train on ``device`` (``"cpu"``, ``"cuda"``)."""
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: must be >= 1")
    if nproc == 1:
        return
    kind = torch.device(device)
    if kind.type not in ("cpu", "cuda"):
        raise ValueError(f"--nproc {nproc}: data-parallel training runs on cpu or cuda devices, not {device}")
    if kind.type == "cuda" and kind.index is not None:
        raise ValueError(f"--nproc {nproc} trains on cuda:0..cuda:{nproc - 1}: pass --device cuda, not {device} "
                         "(select GPUs with CUDA_VISIBLE_DEVICES)")
    visible = available_devices(device)
    if nproc > visible:
        what = "GPUs are visible" if kind.type == "cuda" else "CPU cores are available"
        raise ValueError(f"--nproc {nproc}: only {visible} {what} to this site")


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: ``cuda:<rank>`` on GPUs, ``cpu`` on CPUs."""
    return f"cuda:{rank}" if torch.device(device).type == "cuda" else "cpu"


class SiteWorkers:
    """Ranks 1..nproc-1 of this site, started by ``start()`` in this process (rank 0) and stopped by ``close()``."""

    def __init__(self, nproc: int, device: str, data_dir: Path, cache_dir: Path | None, threads: int,
                 log_level: str = "INFO") -> None:
        self.nproc = nproc
        self.device = device
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.threads = threads
        self.log_level = log_level
        self.group = DataParallel(0, nproc)
        self._procs: list = []
        self._queues: list = []
        self._store = None

    def start(self) -> None:
        """Spawn the workers and join the process group with them (returns once every rank is in)."""
        backend = "nccl" if torch.device(self.device).type == "cuda" else "gloo"
        # Port 0: the store picks a free port, so concurrent sites on one host cannot collide.
        self._store = torch.distributed.TCPStore("127.0.0.1", 0, self.nproc, is_master=True,
                                                 wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
        context = multiprocessing.get_context("spawn")
        for rank in range(1, self.nproc):
            queue = context.SimpleQueue()
            proc = context.Process(
                target=_worker_main, name=f"fedvlm-rank-{rank}", daemon=True,
                args=(rank, self.nproc, self._store.port, backend, rank_device(self.device, rank), self.data_dir,
                      self.cache_dir, self.threads, self.log_level, queue))
            proc.start()
            self._procs.append(proc)
            self._queues.append(queue)
        torch.distributed.init_process_group(backend, store=self._store, rank=0, world_size=self.nproc,
                                             timeout=COLLECTIVE_TIMEOUT)
        log.info("data-parallel group ready: %d processes (%s)", self.nproc, backend)

    def start_round(self, learner_key: tuple[str, int], global_bytes: bytes, round_index: int, total_rounds: int,
                    client_state: dict[str, torch.Tensor]) -> None:
        """Ask every worker to train this round (rank 0 then trains its own share); ``WorkerError`` if one exited.
        ``learner_key``: (task spec JSON, site-local LoRA rank or 0), as the agent builds its learner."""
        dead = [proc.name for proc in self._procs if not proc.is_alive()]
        if dead:
            raise WorkerError(f"data-parallel worker {', '.join(dead)} exited (see its log lines above)")
        spec_json, lora_rank = learner_key
        command = (spec_json, lora_rank, global_bytes, round_index, total_rounds, adapters.to_bytes(client_state))
        for queue in self._queues:
            queue.put(command)

    def close(self) -> None:
        """Stop the workers (they finish the command at hand first) and leave the process group."""
        for queue in self._queues:
            queue.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _worker_main(rank: int, world_size: int, port: int, backend: str, device: str, data_dir: Path,
                 cache_dir: Path | None, threads: int, log_level: str, commands) -> None:
    """One worker: join the group, then train each round commanded until told to stop (None)."""
    from fedvlm.logs import setup_logging
    from fedvlm.spec import TaskSpec

    setup_logging(log_level, prefix=f"rank {rank} ")
    if threads:
        torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    store = torch.distributed.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                         timeout=COLLECTIVE_TIMEOUT)
    group = DataParallel(rank, world_size)
    learner, key = None, None
    try:
        while (command := commands.get()) is not None:
            spec_json, lora_rank, global_bytes, round_index, total_rounds, state_bytes = command
            if key != (spec_json, lora_rank):
                from fedvlm.learner import Learner

                learner = None  # free the previous model before building the next one
                learner = Learner(TaskSpec.from_json(spec_json), data_dir, device=device, cache_dir=cache_dir,
                                  lora_rank=lora_rank)
                key = (spec_json, lora_rank)
            learner.federated_round(adapters.from_bytes(global_bytes), round_index, total_rounds,
                                    adapters.from_bytes(state_bytes), group=group)
            log.info("round %d: trained my shard", round_index)
    finally:
        torch.distributed.destroy_process_group()
