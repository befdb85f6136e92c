"""The training loops: semi-on-policy (stream a replay buffer) and on-policy (collect, then K updates).

Both run the same update (:class:`~streamalign.train.trainer.Trainer`): every group of the batch goes
through the objective one at a time (memory of one group), its loss divided by the global batch, gradients
summed over ranks (torch.distributed all-reduce under torchrun), clipped, one AdamW step. The semi loop's
global batches are those of one process (the buffer's stream under the seed); each rank trains on its slice
of every one. Random choices inside the objective come from a generator seeded by (seed, step, entry id),
so they do not depend on rank or batch order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..adapters.lora import save_lora
from ..buffer.manifest import read_manifest
from ..buffer.reader import BufferReader
from ..buffer.urls import local_path
from ..collect.collector import CollectConfig, collect, prepare
from ..distributed import all_reduce, rank_and_world
from ..extras import require
from ..io.files import require_paths, staged_folder, write_atomic
from ..io.outputs import MARKER, open_output, overwrite_permitted, permit_overwrite
from ..io.progress import progress_bar
from ..models.noise import derive_seed
from ..models.placement import Placement
from ..pipeline import Pipeline, resolve_config
from ..plan import StagePlan, check_stage, stage_reward_hold
from ..rewards.sources import reward_of
from ..schemas.buffer import Entry
from ..schemas.run import RUN_FILE, read_run_file, run_record
from .config import TrainConfig
from .health import CURVE_KEYS, health, plot_rows
from .identity import Resume, UnfinishedRun, check_run_folder
from .metrics import METRICS, MetricsLog, read_metrics
from .state import Progress, resume_checkpoint, save_checkpoint
from .trainer import NonFiniteError, Trainer, init_policy_id, policy_text  # noqa: F401  (NonFiniteError: what train() raises, from an update)

log = logging.getLogger("streamalign.train")


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    adapter: Path
    final: dict
    damaged: list[str] | None = None  # shards skipped as damaged (--skip-damaged), over every rank

    def line(self, out: str | Path) -> str:
        f = self.final
        ev = f" eval composite {f['eval_composite']:.4f};" if "eval_composite" in f else ""
        skipped = "" if self.damaged is None else f" {len(self.damaged)} damaged shard(s) skipped;"
        return (f"{out}: {self.steps} updates in {self.seconds:.1f} s; last loss {f.get('loss', float('nan')):.4g};"
                f"{ev}{skipped} adapter {self.adapter}")


def _entries(reader: BufferReader, epoch: int, skip: int):
    """Entries of the buffer's stream from (epoch, skip) onward, epoch after epoch: yields (entry, epoch,
    index)."""
    while True:
        reader.set_epoch(epoch)
        for i, e in enumerate(reader):
            if i >= skip:
                yield e, epoch, i + 1
        epoch, skip = epoch + 1, 0


def rank_share(stream, batch: int, rank: int, world: int) -> tuple[list[Entry], int, int]:
    """Rank `rank`'s slice of the next global batch of `batch` groups from `stream` (see :func:`_entries`):
    its consecutive groups ``rank * batch / world ...``, and the stream position (epoch, index) after the
    batch. The other ranks' groups are read and dropped (never held: host memory of one rank's share)."""
    k = batch // world
    mine, epoch, index = [], 0, 0
    for i in range(batch):
        e, epoch, index = next(stream)
        if rank * k <= i < (rank + 1) * k:
            mine.append(e)
    return mine, epoch, index


def _check_fits(cfg: TrainConfig, world: int) -> StagePlan | None:
    """``plan``'s train stage at this run's settings (group size: the buffer's largest, semi; the reward models
    when it scores: --mode on or --eval-every) on its device; None on a CPU."""
    m, hw = cfg.model, cfg.hardware
    placement = Placement.of(hw, apply_threads=False)
    if placement.device.type != "cuda":
        return None
    g = cfg.rollouts.group_size
    if cfg.mode == "semi":
        g = max(read_manifest(cfg.data.buffer).column("group_size").to_pylist(), default=g)
    scores = cfg.mode == "on" or bool(cfg.logging.eval_every)
    return check_stage("train", resolve_config(m.config, m.wan_dir), placement, cfg.rollouts if scores else None,
                       group_size=g, objective=cfg.objective.name, replay_batch=hw.replay_batch,
                       checkpointing=hw.checkpointing, autocast=hw.autocast, lora_rank=cfg.lora.lora_rank,
                       batch_groups=cfg.optim.batch_groups, gpus=world, shard_base=hw.shard_base)  # fmt: skip


def _check_buffer(cfg: TrainConfig, trainer: Trainer) -> None:
    buffer = cfg.data.buffer
    table = read_manifest(buffer)
    if table.num_rows == 0:
        raise ValueError(f"buffer {buffer} is empty: collect some groups first")
    names = set(table.column("config_name").to_pylist())
    if names != {trainer.policy.config.name}:
        raise ValueError(
            f"buffer {buffer} holds groups of model config {sorted(names)}, this run uses "
            f"{trainer.policy.config.name!r}: pass the buffer's --config"
        )
    _check_policy(cfg, trainer, set(table.column("policy_id").to_pylist()))


def _check_policy(cfg: TrainConfig, trainer: Trainer, buffer_ids: set[str]) -> None:
    """Semi-on-policy: the buffer's groups were rolled out by the policy this run trains (its base weights
    and shipped LoRA; or that policy with --init-adapter, which the run continues from). Another base or
    LoRA is refused in one line naming both."""
    m = cfg.model
    ours = {trainer.policy.policy_id}
    if cfg.lora.init_adapter is not None:
        ours.add(init_policy_id(cfg))
    if buffer_ids <= ours:
        return
    local = local_path(cfg.data.buffer)
    recorded = read_run_file(local / RUN_FILE).get("model", {}) if local and (local / RUN_FILE).is_file() else {}
    theirs = ", ".join(f"{k} {recorded[k]}" for k in ("checkpoint", "base_lora", "lora") if recorded.get(k))
    raise ValueError(
        f"buffer {cfg.data.buffer} was collected by policy {', '.join(sorted(buffer_ids - ours))}"
        f"{f' ({theirs})' if theirs else ''}, but this run trains policy {trainer.policy.policy_id} "
        f"({policy_text(m)}): train with the buffer's --checkpoint/--base-lora, or collect a buffer of this policy"
    )


def _rollout_config(cfg: TrainConfig, trainer: Trainer, world: int, it: int) -> CollectConfig:
    """The collection of on-policy iteration `it`: fresh groups of the current policy."""
    ro, groups = cfg.rollouts, cfg.optim.batch_groups
    return CollectConfig(
        prompts=ro.prompts, groups=groups, group_size=ro.group_size, strength=ro.strength,
        seed=derive_seed(cfg.seed, 7, it), format=ro.format, rewards=ro.rewards, metrics=ro.metrics,
        reward_paths=ro.reward_paths, reward_options=ro.reward_options, reward_plugins=ro.reward_plugins,
        reward_device=ro.reward_device, reward_offload=ro.reward_offload,
        entries_per_shard=max(1, groups // world), fork=trainer.objective.fork, clip_chunks=ro.clip_chunks,
        **ro.routing_settings(),
    )  # fmt: skip


@dataclass
class Steps:
    """What both loops share: the trainer, the run's progress and folder, and one update's bookkeeping
    (log row, periodic evaluation, progress bar, checkpoint)."""

    cfg: TrainConfig
    trainer: Trainer
    state: Progress
    out: Path
    rank: int
    world: int
    logger: MetricsLog | None
    bar: object
    total: int  # updates of the whole run
    last: dict = field(default_factory=dict)  # the newest log row

    def finish(self, stats: dict, t_step: float, slots: int = 1) -> None:
        """Log one update; `slots` > 1: an early stop that skips the iteration's remaining updates (the
        step counter keeps iteration x K, so the lr schedule and evaluation points stay where they were)."""
        log_cfg, state = self.cfg.logging, self.state
        before = state.step
        state.step += slots
        row = {"step": state.step, **stats, "step_time_s": round(time.time() - t_step, 4)}
        every = log_cfg.eval_every
        crossed = every and (state.step // every > before // every or state.step == self.total)
        if crossed and log_cfg.eval_prompts:
            row.update(self.trainer.evaluate(log_cfg.eval_prompts, log_cfg.eval_seed))
        if self.logger is not None:
            self.logger.log(row)
        self.last = row
        self.bar.update(slots)
        reward = stats.get("reward", float("nan"))
        self.bar.set_postfix(loss=f"{stats['loss']:.3g}", reward=f"{reward:.3f}", s=f"{row['step_time_s']:.2f}")

    def save(self) -> None:
        _save(self.out, self.trainer, self.state, self.rank, self.world)


def semi_on_policy(run: Steps) -> BufferReader:
    """`--steps` updates over fork groups streamed from the buffer. Every rank reads the stream of one
    process (a function of the seed and the buffer alone) and trains on its slice of each global batch, so
    N ranks update as one process would. Returns the reader (its damaged shards)."""
    cfg, state, optim = run.cfg, run.state, run.cfg.optim
    d = cfg.data
    reader = BufferReader(d.buffer, shuffle=d.shuffle, seed=cfg.seed, where=d.filter, weights=d.reward_weights,
                          skip_damaged=d.skip_damaged)  # fmt: skip
    stream = _entries(reader, state.epoch, state.consumed)
    while state.step < cfg.schedule.steps:
        t_step = time.time()
        stats: dict = {}
        for micro in range(optim.accum):
            groups, state.epoch, state.consumed = rank_share(stream, optim.batch_groups, run.rank, run.world)
            stats = run.trainer.update(
                state.step, groups, optim.batch_groups, zero=micro == 0, apply=micro + 1 == optim.accum
            )
        run.finish(stats, t_step)
        if state.step % cfg.logging.save_every == 0 or state.step == cfg.schedule.steps:
            run.save()
    return reader


def on_policy(run: Steps) -> None:
    """`--steps` iterations: collect fresh fork groups with the current policy into `out/rollouts`, then
    `--updates-per-iter` updates on them (stopped early past `--target-kl`)."""
    cfg, state, trainer = run.cfg, run.state, run.trainer
    k_updates = cfg.rollouts.updates_per_iter
    rollouts = run.out / "rollouts"
    while state.iteration < cfg.schedule.steps:
        it = state.iteration
        ccfg = _rollout_config(cfg, trainer, run.world, it)
        trainer.model.eval()
        version = f"{trainer.policy.policy_id}+it{it:05d}"
        policy = trainer.policy
        rollout_policy = Pipeline(policy.config, trainer.model, policy.text, policy.codec, version)
        trainer.old.weights.pop(f"{trainer.policy.policy_id}+it{it - 1:05d}", None)
        trainer.old.remember(version)  # this iteration's old policy: its rollouts' weights
        prefix = f"it{it:05d}-"
        with trainer.autocast():  # the updates' precision; branch batches from the device's free memory
            collect(rollout_policy, ccfg, rollouts, run.rank, run.world, progress=False, shard_prefix=prefix,
                    reward_hold=trainer.reward_hold)  # fmt: skip
        trainer.model.train()
        if run.world > 1:
            dist.barrier()
        where = f"SELECT entry_id FROM manifest WHERE run_id = '{ccfg.run_id}'"
        reader = BufferReader(rollouts, run.rank, run.world, shuffle=1, seed=cfg.seed, where=where, collection=prefix)
        groups = list(reader)
        target = trainer.objective.target_kl
        for k in range(k_updates):
            t_step = time.time()
            stats = trainer.update(state.step, groups, cfg.optim.batch_groups, kl_limit=target)
            stop = bool(stats.get("kl_stop"))
            run.finish(stats, t_step, k_updates - k if stop else 1)
            if stop:
                log.info("iteration %d: approx KL %.3g > --target-kl %g at update %d of %d: the rest skipped",
                         it + 1, stats["approx_kl"], target, k + 1, k_updates)  # fmt: skip
                break
        state.iteration += 1
        if state.iteration % cfg.logging.save_every == 0 or state.iteration == cfg.schedule.steps:
            run.save()


def train(
    cfg: TrainConfig, out: str | Path, resume: Resume = False, progress: bool = True, overwrite: bool = False
) -> TrainSummary:
    """Run the configured loop into `out` (adapter/, checkpoints/, metrics.jsonl, curves.png, run.yaml).
    `resume`: continue the run in `out` from its newest intact checkpoint ("auto": when it has one);
    `overwrite` (or ``--overwrite``): start afresh in a folder that holds an earlier run (replaced whole)."""
    overwrite = overwrite or overwrite_permitted(out)
    out = Path(out)
    cfg = cfg.resolve()
    with rank_and_world() as (rank, world), UnfinishedRun(out) as unfinished:
        if cfg.hardware.threads:
            torch.set_num_threads(cfg.hardware.threads)
        if cfg.optim.batch_groups % world:
            raise ValueError(f"--batch-groups {cfg.optim.batch_groups} is not divisible by the {world} ranks")
        if cfg.logging.wandb:
            require("wandb", "wandb", "--wandb")  # before any model loads
        if cfg.mode == "on" or cfg.logging.eval_every:
            reward_of(cfg.rollouts)  # reward names, paths and plug-ins checked before any model loads
        resume = check_run_folder(out, cfg, resume, overwrite)
        sp = _check_fits(cfg, world)  # on a GPU: refused in one line before the weights load when it will not fit
        trainer = Trainer(cfg, rank, world)
        trainer.reward_hold = stage_reward_hold(cfg.rollouts.reward_offload, sp)
        if cfg.mode == "semi":
            _check_buffer(cfg, trainer)
        state = Progress()
        if resume:
            state = resume_checkpoint(out, trainer.peft, trainer.opt, trainer.objective)
        if cfg.mode == "on":  # the rollouts' settings are checked before anything is written
            prepare(_rollout_config(cfg, trainer, world, 0), trainer.policy.config)
        if rank == 0:  # an earlier run is replaced only now that the inputs are known good
            with permit_overwrite(out) if overwrite else contextlib.nullcontext():
                open_output(out, "train")
            # what an earlier run left (its rollouts, reused: a run is deterministic) is kept if this one fails
            unfinished.arm({e.name for e in out.iterdir()} - {MARKER, RUN_FILE, METRICS})
            write_atomic(out / RUN_FILE, run_record(cfg, "train"))
        if world > 1:
            dist.barrier()  # nobody writes into `out` before it is ready
        logger = (
            MetricsLog(out, state.step if resume else None, cfg.model_dump(mode="json"), cfg.logging.wandb)
            if rank == 0
            else None
        )
        t0 = time.time()
        total = cfg.schedule.steps * (1 if cfg.mode == "semi" else cfg.rollouts.updates_per_iter)
        bar = progress_bar(total=total, initial=state.step, desc=f"train[{cfg.mode}]", show=progress and rank == 0)
        run = Steps(cfg, trainer, state, out, rank, world, logger, bar, total)
        if cfg.mode == "semi":
            reader = semi_on_policy(run)
            damaged = _all_damaged(reader, world) if cfg.data.skip_damaged else None
        else:
            on_policy(run)
            damaged = None
        bar.close()
        if rank == 0:
            with staged_folder(out / "adapter") as tmp:  # never a half-written final adapter
                save_lora(trainer.peft, tmp)
            logger.close()
            rows = read_metrics(out / METRICS)
            plot_rows(rows, out / "curves.png", CURVE_KEYS)
            summary = {"steps": state.step, "final": run.last, "health": health(rows, cfg.model_dump(mode="json")),
                       **({} if damaged is None else {"damaged_shards": damaged})}  # fmt: skip
            write_atomic(out / "summary.json", json.dumps(summary, indent=1))
        return TrainSummary(state.step, time.time() - t0, out / "adapter", run.last, damaged)


def train_stage(cfg: TrainConfig, out: str | Path, resume: bool = False, overwrite: bool = False) -> str:
    """The `train` command: check the input paths, run, and return the summary line."""
    buffer = cfg.data.buffer and local_path(cfg.data.buffer)  # a URL's files are checked as they are read
    require_paths((buffer, "buffer"), (cfg.lora.init_adapter, "adapter"), (cfg.model.checkpoint, "checkpoint"))
    return train(cfg, out, resume=resume, overwrite=overwrite).line(out)


def _all_damaged(reader: BufferReader, world: int) -> list[str]:
    """The shards any rank skipped as damaged (a multi-hot vector over the shard names, max-reduced)."""
    names = sorted(reader.shards)
    hot = torch.tensor([float(n in reader.damaged) for n in names], dtype=torch.float64)
    if world > 1:
        hot = all_reduce(hot, dist.ReduceOp.MAX)
    return [n for n, h in zip(names, hot.tolist(), strict=True) if h]


def _save(out: Path, trainer: Trainer, state: Progress, rank: int, world: int) -> None:
    if rank == 0:
        save_checkpoint(out, trainer.peft, trainer.opt, state, trainer.objective)
    if world > 1:
        dist.barrier()
