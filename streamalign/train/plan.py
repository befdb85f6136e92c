"""The train stage of ``streamalign plan``: one group of a training update, the real ``Trainer.update`` run on
fake tensors at full size (:func:`~streamalign.train.memory.train_update_memory`, every layer: no depth
extrapolation), at the given pivot or the first and the last; ``streamalign.plan`` finds it through the entry point
``streamalign.planners: train`` (pyproject.toml)."""

from __future__ import annotations

import math

from ..plan import CUDA_RESERVE, Phase, PlanContext, PlanRun, StagePlan, storage_bytes
from .config import TrainConfig
from .memory import SIMULATED, train_update_memory


def train_settings(run: PlanRun) -> TrainConfig:
    """The ``train`` settings of the plan's flags (a TrainConfig; auto autocast / checkpointing as on CUDA)."""
    t = run.train
    return TrainConfig(buffer=SIMULATED, objective=t.objective, replay_batch=t.replay_batch, lora_rank=t.lora_rank,
                       checkpointing=t.checkpointing, autocast=t.autocast, batch_groups=t.batch_groups)  # fmt: skip


def plan_train(ctx: PlanContext) -> StagePlan:
    """One group of a training update (``Trainer.update`` as ``train.memory.train_update_memory`` runs it:
    the objective's replay of one fork group of G branches, backward, clip, AdamW step; the steady state, an
    update after the first, which holds AdamW's moments and the old policy's LoRA throughout) at the given pivot,
    or the first and the last, every layer run; the replay batch chosen from the GPU's memory as on CUDA.
    Held besides: the codec and (when it stays on the GPU) the text encoder, as the stages hold them; the
    text phase encodes a prompt the first time it is met. Per group: the text, plus the mean of the
    planned pivots' update FLOPs (exact with ``--pivot``; the first and last otherwise). Per update:
    ``--batch-groups`` groups, split over the GPUs.

    ``--shard-base`` on G > 1 GPUs (FSDP2, see :func:`sharded_peak`): each GPU keeps 1/G of the base weights,
    plus the weights FSDP2 all-gathers for the passes. Arithmetic on the measured replicated update (FSDP2
    cannot run on fake tensors without a process group); not measured on GPUs."""
    return ctx.with_rewards(lambda: _plan_train(ctx))  # held by --mode on (rollouts) and --eval-every


def _plan_train(ctx: PlanContext) -> StagePlan:
    run, cfg = ctx.run, ctx.cfg
    n, g = cfg.num_chunks, run.rollouts.group_size
    pivots = [run.rollouts.pivot] if run.rollouts.pivot is not None else sorted({0, n - 1})
    if any(p >= n for p in pivots):
        raise ValueError(f"--pivot {run.rollouts.pivot} is outside chunks 0..{n - 1} of {cfg.name}")
    if g < 2:
        raise ValueError(f"-G {g}: a training group needs at least 2 branches (advantages)")
    settings = train_settings(run)
    held = storage_bytes(ctx.others())
    phases, batches, notes = [ctx.text_phase(1)], {}, {}
    for p in pivots:
        rep = train_update_memory(cfg, settings, pivot=p, group_size=g, device="cuda", dtype=ctx.dtype,
                                  device_memory=run.memory - CUDA_RESERVE - held, flops=ctx.flops)  # fmt: skip
        batches[p] = rep.notes["replay_batch"]
        notes = rep.notes
        peak = rep.peak
        if run.train.shard_base and run.device.gpus > 1:
            peak = sharded_peak(peak, notes["weights_bytes"], notes["root_bytes"], notes["block_bytes"],
                                run.device.gpus)  # fmt: skip
        phases.append(Phase(f"update p={p} (rb {batches[p]})", peak + held, rep.flops or 0, batches[p]))
    per_rank = math.ceil(run.train.batch_groups / run.device.gpus)
    total = phases[0].flops + sum(ph.flops for ph in phases[1:]) // len(pivots)
    work = f"{run.train.steps} updates of {run.train.batch_groups} groups" + (
        f" on {run.device.gpus} GPUs" if run.device.gpus > 1 else "")  # fmt: skip
    info = {k: notes[k] for k in ("objective", "autocast", "checkpointing", "lora_rank", "lora_bytes")}
    if run.train.shard_base and run.device.gpus > 1:
        info["shard_base"] = f"base weights sharded over {run.device.gpus} GPUs (FSDP2; arithmetic, see docs)"
    return StagePlan("train", "group", run.train.steps * per_rank, phases, unit_flops=total, workload=work,
                     notes={"replay_batch": batches, "pivots": pivots, **info})  # fmt: skip


def sharded_peak(replicated: int, weights: int, root: int, block: int, gpus: int) -> int:
    """Peak bytes of one update with the frozen base sharded over `gpus` by FSDP2 (``train/shard.py``: every
    block, then the root), from the replicated update's peak and its base `weights` (`root`: those outside
    the blocks; `block`: the largest block's): each GPU keeps its 1/gpus of every weight, and during the
    passes holds besides, in full, the root's weights (the embeddings and head: FSDP2 keeps the root
    gathered from its forward through the backward), the block running and the next one (prefetched),
    all-gathered beside their shards."""
    return replicated - weights + math.ceil(weights / gpus) + root + 2 * block
