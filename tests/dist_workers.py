"""Rank functions of the multi-process tests (a light module: each spawned rank imports only this)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from streamalign import distributed

SHAPES = [(3, 5), (7,), (2, 2), (11,)]


def ramp(i: int, rank: int) -> torch.Tensor | None:
    """Rank `rank`'s gradient of parameter i, or None (some ranks have none for some parameters)."""
    if not (i + rank) % 3:
        return None
    return torch.arange(torch.Size(SHAPES[i]).numel(), dtype=torch.float32).view(SHAPES[i]) * (rank + 1) + i


def sum_grads(rank: int, world: int, port: int, out: dict) -> None:
    """Join a gloo group of `world` ranks, all-reduce the ramp gradients in buckets of 40 bytes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
        for i, p in enumerate(params):
            p.grad = ramp(i, rank)
        distributed.all_reduce_grads(params, bucket_bytes=40)  # several buckets
        out[rank] = [p.grad.clone() for p in params]
    finally:
        dist.destroy_process_group()


def load_shards(rank: int, world: int, port: int, checkpoints: list[str], out: dict) -> None:
    """Load each checkpoint of the shapes config sharded over a gloo group (``--shard-base``'s load), with
    every whole-tensor read of a safetensors file recorded; returns each rank's local tensors."""
    import functools

    from streamalign.models import checkpoint
    from streamalign.train.shard import shard_base

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    whole: list[str] = []
    read = checkpoint.LazyTensors.__getitem__
    checkpoint.LazyTensors.__getitem__ = lambda self, k: whole.append(k) or read(self, k)
    try:
        shard = functools.partial(shard_base, device=torch.device("cpu"))
        models = [checkpoint.load_generator("shapes", c, dtype=torch.bfloat16, shard=shard) for c in checkpoints]
        local = [{k: getattr(t, "_local_tensor", t).clone() for k, t in m.state_dict().items()} for m in models]
        out[rank] = (local, whole)
    finally:
        dist.destroy_process_group()
