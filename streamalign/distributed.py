"""Process-group set-up for `torchrun` / `accelerate launch` and the collectives every stage uses.

Under a launcher (``WORLD_SIZE`` > 1; ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` read by
``init_process_group``'s ``env://``), a CUDA machine joins with the backend ``cpu:gloo,cuda:nccl`` after
``torch.cuda.set_device(LOCAL_RANK)`` (``device_id`` binds the group to that GPU); a CPU machine with gloo.
NCCL reduces CUDA tensors only, so every reduced or broadcast tensor goes through :func:`comm_device`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

GPU_BACKEND = "cpu:gloo,cuda:nccl"  # CUDA tensors through NCCL; a CPU tensor (a barrier's) through gloo
BUCKET_BYTES = 64 * 2**20  # gradients reduced in buckets of this size: one bucket's copy held at a time


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``, set by torchrun and accelerate; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def rank_and_world() -> Iterator[tuple[int, int]]:
    """Yield (rank, world size); under torchrun, join the process group and wait for every rank at exit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    started = not dist.is_initialized()
    if started:
        if torch.cuda.is_available():  # one GPU per rank, bound before any CUDA work or communicator
            gpu = torch.device("cuda", local_rank())
            torch.cuda.set_device(gpu)
            dist.init_process_group(GPU_BACKEND, device_id=gpu)
        else:
            dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
        dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def comm_device() -> torch.device:
    """The device a collective's tensors must live on: the rank's GPU when the process group reduces with
    NCCL, else the CPU (gloo, or no process group)."""
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over every rank (a new tensor on `t`'s device, same dtype: float64 statistics stay
    exact); the collective runs on :func:`comm_device`."""
    buf = t.to(comm_device(), copy=True)
    dist.all_reduce(buf, op=op)
    return buf.to(t.device)


def all_reduce_grads(params: Sequence[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum the gradients of `params` over every rank in place (a missing gradient counts as zeros and
    is set): consecutive gradients flattened into buckets of about `bucket_bytes`, one all-reduce each,
    on :func:`comm_device` (the parameters' own device under NCCL: no host round trip)."""
    dev = comm_device()
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes or i + 1 == len(params):
            flat = torch.cat([q.grad.flatten().to(dev) for q in bucket])
            dist.all_reduce(flat)
            offset = 0
            for q in bucket:
                q.grad.copy_(flat[offset : offset + q.numel()].view_as(q))
                offset += q.numel()
            bucket, size = [], 0


def rank0_agrees(ok: bool, world: int) -> bool:
    """Rank 0's `ok`, on every rank (a broadcast; no communication in a single process)."""
    return ok if world == 1 else team_agrees(ok, dist.group.WORLD)


def team_groups(size: int) -> tuple[int, object]:
    """Split the world into consecutive teams of `size` ranks: (this rank's index in its team, the team's
    process group). Every rank creates every team's group (``new_group`` is collective)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = [dist.new_group(list(range(t, t + size))) for t in range(0, world, size)]
    return rank % size, groups[rank // size]


def team_agrees(ok: bool, group: object) -> bool:
    """The team's first rank's `ok`, on every rank of the team (a broadcast within `group`; the whole world
    for :func:`rank0_agrees`)."""
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
