"""Host <-> device copies of the rollout loop that make the host wait only where it reads a result.

On CUDA, host tensors bound for the device (the noises) live in, or are staged through, pinned
(page-locked) memory and are copied with ``non_blocking=True``; device results bound for the host go into
pinned buffers with ``non_blocking=True`` too, and the host waits once (:func:`wait_for_copies`) before
it reads them. Elsewhere these are the plain copies. Either way the bytes are the same: only where they
wait differs. (PyTorch's pinned-memory allocator keeps a block until the copies that use it are done.)
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def pins(device: torch.device) -> bool:
    """Whether copies to and from `device` go through pinned host memory (CUDA)."""
    return device.type == "cuda"


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """An uninitialised host tensor, page-locked when `pinned`."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`t` on `device` in `dtype`, contiguous: from pinned memory without waiting, when `device` pins."""
    if pins(device) and t.device.type == "cpu":
        if not t.is_pinned() or t.dtype != dtype or not t.is_contiguous():
            staged = host_empty(tuple(t.shape), dtype, pinned=True)
            staged.copy_(t)
            t = staged
        return t.to(device, non_blocking=True)
    return t.to(device, dtype).contiguous()


def host_stand_in(t: torch.Tensor) -> torch.Tensor:
    """The host copy of `t` in a plan: a meta tensor of its shape and dtype (no bytes, outside any count)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def to_host(t: torch.Tensor) -> torch.Tensor:
    """`t` on the host: into a pinned buffer without waiting when `t` is on a device that pins (read it
    after :func:`wait_for_copies`), else ``t.cpu()``. A fake tensor (a plan's simulated device, whose stand-in
    is the CPU) goes to the plan's host stand-in, the meta device: it leaves the device's count, as it would
    leave the GPU (``.cpu()`` of a fake CPU tensor would be the same storage, still counted)."""
    if is_fake(t):
        return host_stand_in(t)
    if pins(t.device):
        out = host_empty(tuple(t.shape), t.dtype, pinned=True)
        out.copy_(t, non_blocking=True)
        return out
    return t.cpu()


def wait_for_copies(device: torch.device) -> None:
    """Wait for the copies queued on `device`'s current stream (before the host reads their results)."""
    if pins(device):
        torch.cuda.current_stream(device).synchronize()
