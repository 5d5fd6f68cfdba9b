"""A site's data-parallel group: which examples of an optimizer step this process trains, and the sums that make
N processes take exactly the step one process would (``fedvlm-client --nproc N``).

The group is a ``torch.distributed`` process group that the caller initialises (gloo on CPUs, NCCL on GPUs); a
``DataParallel`` of world size 1 needs none and does nothing. Gradients are summed by hand after the step's
backward passes instead of by ``DistributedDataParallel``: an adapter's gradients are small (MBs), so DDP's overlap
of communication with backward buys little, while its parameter registration at construction would have to be
redone whenever the trainable set changes (F-2stage switches it between rounds) and its averaging would need
``no_sync`` around accumulation; one all-reduce per optimizer step is exact and simple.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the group: ``rank`` of ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")

    def shard(self, indices: Sequence[int]) -> list[int]:
        """This rank's examples of one optimizer step: every ``world_size``-th, from position ``rank`` (the shards
        of all ranks partition ``indices``; a rank may get none when there are fewer examples than ranks)."""
        return list(indices[self.rank :: self.world_size])

    def sum_scalar(self, value: float, device: torch.device) -> float:
        """The sum of ``value`` over the group."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return float(tensor.item())

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace every ``p.grad`` by its sum over the group, in one all-reduce (a rank without a gradient for
        ``p`` adds zeros; ``p.grad`` stays None only if no rank has one, as it would in one process)."""
        if self.world_size == 1 or not params:
            return
        device = params[0].device
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params])
        torch.distributed.all_reduce(present)
        torch.distributed.all_reduce(flat)
        offset = 0
        for p, seen in zip(params, present.tolist(), strict=True):
            size = p.numel()
            p.grad = flat[offset : offset + size].view_as(p).to(p.dtype) if seen else None
            offset += size


SINGLE_PROCESS = DataParallel()
