"""``--shard-base``: the frozen base sharded over the ranks with FSDP2 (``fully_shard`` per transformer block,
then the root), the trainable LoRA factors left out of it (replicated, reduced like any gradient).

FSDP2 all-gathers a block's weights before each of its forwards and backwards, so every rank must run the
same sequence of model passes, whatever its groups hold. Each rank's update stays data-parallel, made
uniform by: the prefix padded to the slot's longest with throwaway forwards (:class:`Lockstep`, used by the
replay), one replay batch for every rank, and a group that would skip its replay (no reward variance, a
non-finite value) replaying a stand-in with a zero gradient instead (:func:`stand_in`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ..distributed import all_reduce
from ..schemas.buffer import Entry


def shard_base(model: torch.nn.Module, device: torch.device) -> None:
    """Shard the base `model` (before its LoRA is attached: the LoRA stays out of FSDP) over the process
    group on `device`'s type, every block, then the root. On the meta device (a checkpoint about to be
    read, see :func:`~streamalign.models.checkpoint.load_generator`) nothing is moved: each rank's shards
    are read afterwards; a model in memory has its weights moved to `device` block by block and split."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def kept_bytes(model: torch.nn.Module) -> int:
    """Bytes of frozen base weights this rank keeps between passes (its shards)."""
    local = [getattr(p, "_local_tensor", p) for p in model.parameters() if not p.requires_grad]
    return sum(t.numel() * t.element_size() for t in local)


class Lockstep:
    """Agreement of every rank before a replay's model passes (one all-reduce each)."""

    @staticmethod
    def most(*values: int) -> list[int]:
        """The largest of each value over the ranks."""
        return [int(v) for v in all_reduce(torch.tensor(values, dtype=torch.float64), dist.ReduceOp.MAX).tolist()]

    @classmethod
    def rows_batch(cls, rows: int, batch: int) -> int:
        """The replay batch of every rank (the smallest); rows must be the same number on every rank."""
        most_rows, fewest_rows, smallest = cls.most(rows, -rows, -batch)
        if most_rows != -fewest_rows:
            raise ValueError(f"--shard-base: the ranks replay groups of {-fewest_rows}..{most_rows} rows at once; "
                             "it needs groups of one size (one --group-size in the buffer)")  # fmt: skip
        return -smallest


def stand_in(entry: Entry) -> Entry:
    """`entry` with rewards that carry signal (branch index powers, one per reward) and finite: a group whose
    replay runs the same passes as any other; its loss is multiplied by zero."""
    g = entry.group_size
    index = torch.arange(g, dtype=torch.float32)
    rewards = {k: (index + 1) ** (i + 1) / g ** (i + 1) for i, k in enumerate(sorted(entry.rewards))}
    return dataclasses.replace(entry, rewards=rewards)
