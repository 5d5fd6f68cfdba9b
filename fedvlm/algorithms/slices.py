"""Element-wise float64 math over a model's tensors in cache-sized slices, through reused buffers.

Written by hand because no library op does it: torch's CPU kernels copy a mixed-dtype input to the common dtype
first (a temporary the size of the tensor) and every step of an expression allocates its result, so over a 64 MiB
model each step is a pass over memory plus thousands of page faults. The same element-wise operations, in the same
order, a slice at a time through buffers that stay in L2 give bit-identical results in a fraction of the passes
(bench/aggregation_speed.py). A slice is a multiple of every SIMD width, so each element takes the same vector or
scalar path of a kernel as it does over the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 15  # float64 elements per slice: 256 KiB per buffer (a few fit in L2)


class Scratch:
    """`count` reused float64 buffers of CHUNK elements."""

    def __init__(self, count: int) -> None:
        self._buffers = [torch.empty(CHUNK, dtype=torch.float64) for _ in range(count)]

    def slices(self, numel: int) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """(the slice of a flat tensor of `numel` elements, the buffers cut to its length), slice after slice."""
        for start in range(0, numel, CHUNK):
            stop = min(start + CHUNK, numel)
            yield slice(start, stop), [buffer[:stop - start] for buffer in self._buffers]


def check_shape(tensor: torch.Tensor, base: torch.Tensor, what: str) -> None:
    """The ValueError whole-tensor broadcasting would have raised for a `what` ("delta", "update tensor") whose
    shape is not the base's."""
    if tensor.shape != base.shape:
        raise ValueError(f"{what} of shape {tuple(tensor.shape)} for a base of {tuple(base.shape)}")


def plus(base: torch.Tensor, delta: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """(base + delta) in float64, returned in the base's dtype: ``torch.add(delta.double(), base).to(base.dtype)``
    bit for bit, without its two float64 temporaries.

    A contiguous float64 `delta` is used up: the result is written over the front of its memory (no new tensor
    the size of the model, so no page faults). That is safe slice by slice in order: slice [s, e) of the result
    occupies bytes [k s, k e) of the delta (k = the base's element size, at most 8), whose elements were all read
    by the time slice [s, e) has been copied into the buffer."""
    check_shape(delta, base, "delta")
    flat_delta, flat_base = delta.reshape(-1), base.reshape(-1)
    if delta.dtype == torch.float64 and delta.is_contiguous() and base.element_size() <= delta.element_size():
        flat_out = flat_delta.view(torch.uint8)[:flat_delta.numel() * base.element_size()].view(base.dtype)
    else:
        flat_out = torch.empty(flat_delta.numel(), dtype=base.dtype)
    for part, (x,) in scratch.slices(flat_out.numel()):
        x.copy_(flat_base[part])
        x.add_(flat_delta[part])
        flat_out[part].copy_(x)
    return flat_out.view(base.shape)
