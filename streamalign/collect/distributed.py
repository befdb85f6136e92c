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


def comm_device() -> torch.device:
    """Where the process group's tensors must live: the rank's CUDA device under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def team_groups(size: int) -> tuple[int, object]:
    """Split the world into consecutive teams of `size` ranks: (this rank's index in its team, the team's
    process group). Every rank creates every team's group (``new_group`` is collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(t, t + size))) for t in range(0, world, size)]
    return rank % size, groups[rank // size]


def team_agrees(ok: bool, group: object) -> bool:
    """The team's first rank's `ok`, on every rank of the team (a broadcast within `group`)."""
    flag = torch.tensor([float(ok)], device=comm_device())
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    return bool(flag.item())


def gather_rows(t: torch.Tensor, group: object) -> torch.Tensor | None:
    """Every rank's `t` [n, ...] (the same shape and dtype on each) concatenated along dim 0 in rank order,
    on the team's first rank (None on the others). Sent as raw bytes: exact for any dtype and backend."""
    data = t.detach().contiguous().view(-1).view(torch.uint8).to(comm_device())
    first = dist.get_global_rank(group, 0)
    parts = [torch.empty_like(data) for _ in range(dist.get_world_size(group))] if dist.get_rank() == first else None
    dist.gather(data, parts, dst=first, group=group)
    if parts is None:
        return None
    return torch.cat(parts).to(t.device).view(t.dtype).view(-1, *t.shape[1:])
