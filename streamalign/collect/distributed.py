"""Process-group set-up for `torchrun` (gloo on CPU, nccl on CUDA); single process otherwise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def rank_and_world() -> Iterator[tuple[int, int]]:
    """Yield (rank, world size); under torchrun, join the process group and wait for every rank at exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def rank0_agrees(ok: bool, world: int) -> bool:
    """Rank 0's `ok`, on every rank (a broadcast; no communication in a single process)."""
    if world == 1:
        return ok
    flag = torch.tensor([float(ok)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(flag, src=0)
    return bool(flag.item())
