"""The training loops: semi-on-policy (stream a replay buffer) and on-policy (collect, then K updates).

Both run the same update: every group of the batch goes through the objective one at a time (memory of
one group), its loss divided by the global batch, gradients summed over ranks (torch.distributed
all-reduce under torchrun), clipped, one AdamW step. The semi loop's global batches are those of one
process (the buffer's stream under the seed); each rank trains on its slice of every one. Random choices
inside the objective come from a generator seeded by (seed, step, entry id), so they do not depend on rank
or batch order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..adapters.lora import LoraSettings, attach_lora, cast_lora_inputs, load_lora, lora_parameters, save_lora
from ..buffer.manifest import read_manifest
from ..buffer.reader import BufferReader
from ..buffer.urls import local_path
from ..collect.collector import CollectConfig, collect, prepare
from ..distributed import all_reduce, all_reduce_grads, rank_and_world
from ..extras import require
from ..io.files import require_paths, staged_folder, write_atomic
from ..io.outputs import MARKER, open_output, overwrite_permitted, permit_overwrite
from ..io.progress import progress_bar
from ..models.checkpoint import shipped_lora
from ..models.kv_cache import compute_dtype
from ..models.noise import derive_seed
from ..models.placement import Placement
from ..models.sampler import Sampler
from ..optim import lr_at
from ..pipeline import Pipeline, base_checkpoint, describe_policy, policy_id, resolve_config
from ..plan import StagePlan, check_stage, stage_reward_hold
from ..rewards.sources import reward_of
from ..schemas.buffer import Entry, SchemaError
from ..schemas.config import ModelConfig
from ..schemas.run import RUN_FILE, read_run_file, run_record
from ..schemas.sections import ModelSection
from ..scoring import bootstrap_ci, score_policy
from .config import TrainConfig
from .health import CURVE_KEYS, health, plot_rows
from .identity import Resume, UnfinishedRun, check_run_folder
from .metrics import METRICS, MetricsLog, read_metrics
from .objectives import GroupInput
from .objectives.base import composite_rewards
from .old_policy import OldPolicy, recompute_wanted
from .plan import plan_train  # noqa: F401  (registers the train stage that check_stage plans)
from .replay import PivotReplay
from .shard import kept_bytes, shard_base, stand_in
from .state import Progress, resume_checkpoint, save_checkpoint

log = logging.getLogger("streamalign.train")


def entry_seed(seed: int, step: int, entry_id: str) -> int:
    return derive_seed(seed, 9, step, int(hashlib.sha256(entry_id.encode()).hexdigest()[:12], 16))


class NonFiniteError(ValueError):
    """A non-finite loss, reward or gradient: the run stops before the optimizer step, so every checkpoint
    written so far (and the parameters) stay finite."""


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


class Trainer:
    """Pipeline with a trainable LoRA, its optimizer and the shared update step. `pipeline`: the base
    policy already in memory (default: loaded from the model section; the memory planner passes one
    with simulated weights)."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, pipeline: Pipeline | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.reward_hold: str | None = None  # --reward-offload resolved by train() from its plan (None: no plan)
        hw, m = cfg.hardware, cfg.model
        place = Placement.of(hw, apply_threads=False)  # the frozen base in --dtype; LoRA and AdamW in fp32
        self.device = place.device
        self.bf16, checkpointing = hw.resolved(self.device.type)
        model_cfg = cfg.cache.apply(resolve_config(m.config, m.wan_dir))
        self.lockstep = hw.shard_base and world > 1  # every rank runs the same model passes
        shard = functools.partial(shard_base, device=self.device) if self.lockstep else None
        if pipeline is None:  # --shard-base: each rank reads only its shard of the base weights
            base = Pipeline.of_section(m, place, config=model_cfg, shard=shard)
        else:
            base = pipeline
            if shard is not None:
                shard(base.model)
        if cfg.lora.init_adapter is not None:
            self.peft = load_lora(base.model, cfg.lora.init_adapter, trainable=True)
        else:
            self.peft = attach_lora(base.model, LoraSettings(cfg.lora.lora_rank, cfg.lora.lora_alpha), seed=cfg.seed)
        if pipeline is None:  # the saved adapter names the policy it adapts
            self.peft.peft_config["default"].base_model_name_or_path = policy_text(m)
        self.model = self.peft.base_model.model  # the CausalWanModel, LoRA layers injected
        self.model.train()
        cast_lora_inputs(self.peft, not self.bf16)
        self.model.gradient_checkpointing = checkpointing
        self.policy = Pipeline(base.config, self.model, base.text, base.codec, base.policy_id)
        self.sampler = Sampler(self.model, base.config)
        self.replay = PivotReplay(self.sampler, cfg.data.context, hw.replay_batch)
        self.objective = cfg.objective.build()
        self.params = [p for _, p in lora_parameters(self.peft)]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.objective.bind(self.params)  # objectives with policy copies (NFT: old and reference) keep them
        # the old predictions of a replay: recomputed under this run's numerics for entries of a known policy
        self.reduced = self.bf16 or compute_dtype(self.model) != torch.float32
        self.old = self.replay.old = OldPolicy(self.params)
        self.old.remember(base.policy_id, [torch.zeros_like(p) if ".lora_B." in n else p.detach().clone()
                                           for n, p in lora_parameters(self.peft)])  # fmt: skip  (B = 0: the base)
        if cfg.lora.init_adapter is not None and pipeline is None:  # a buffer collected with the starting adapter
            self.old.remember(init_policy_id(cfg))
        self.unknown_policies = 0  # entries whose rollout policy this run cannot recompute (stored predictions)
        if self.lockstep:
            self.replay.lockstep = True
            if rank == 0:
                log.info("--shard-base: the frozen base is sharded over %d ranks with FSDP2 (%.1f MiB of base "
                         "weights kept per rank)", world, kept_bytes(self.model) / 2**20)  # fmt: skip
        self.text_mismatches = 0  # entries whose prompt embedding hash differs from this run's encoding

    def autocast(self) -> torch.autocast:
        """The compute precision of this run's forwards (updates and on-policy rollouts alike)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def text(self, prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return self.policy.text.encode([prompt])  # cached per process by the text encoder

    def check_entry(self, e: Entry) -> None:
        c = self.policy.config
        if e.arch_id != c.arch_id or e.num_chunks != c.num_chunks:
            raise SchemaError(
                f"entry {e.entry_id} was collected with model config {e.config_name!r} (arch {e.arch_id}), "
                f"not {c.name!r} (arch {c.arch_id}): train with the buffer's --config"
            )
        if e.text_hash is not None and e.text_hash != self.policy.text.embedding_hash(e.prompt):
            if not self.text_mismatches:
                log.warning("entry %s was rolled out with prompt embeddings (hash %s) that differ from this run's "
                            "(%s): another text encoder, --dtype or --device than at collection", e.entry_id,
                            e.text_hash, self.policy.text.embedding_hash(e.prompt))  # fmt: skip
            self.text_mismatches += 1

    @staticmethod
    def bad_reward(e: Entry) -> str | None:
        """The rewards of group `e` that are not finite (or its composite under the weights in force)."""
        bad = sorted(k for k, r in e.rewards.items() if not torch.isfinite(r).all())
        if bad or not torch.isfinite(composite_rewards(e)).all():
            return ", ".join(bad) or "composite under the weights in force"
        return None

    def grads_finite(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def update(
        self, step: int, groups: list[Entry], global_batch: int, zero: bool = True, apply: bool = True,
        kl_limit: float | None = None,
    ) -> dict:  # fmt: skip
        """Accumulate the objective over this rank's `groups`; with `apply`, reduce and step. Returns stats
        averaged over every rank's groups. `kl_limit`: when the measured approx_kl (of the policy before
        this update, vs the old policy) is above it, the step is not applied and ``kl_stop`` is 1."""
        if zero:
            self.opt.zero_grad(set_to_none=True)
        sums: dict[str, list[float]] = {}  # key -> [sum, groups that reported it]
        bad: str | None = None  # the first non-finite value of this rank: the step is not applied
        for e in groups:
            self.check_entry(e)
            self.replay.recompute_old = recompute_wanted(self.cfg.hardware.old_predictions, self.reduced, e.dtype)
            if self.replay.recompute_old and self.old.of(e.policy_id) is None:
                if not self.unknown_policies:
                    log.warning("entry %s was rolled out by policy %s, which this run does not start from: its "
                                "stored old predictions are used (the ratio of an unchanged policy may not be 1)",
                                e.entry_id, e.policy_id)  # fmt: skip
                self.unknown_policies += 1
            e = e.cast(torch.float32)  # stored bf16/fp16 latents: the sampler works in float32
            seed = entry_seed(self.cfg.seed, step, e.entry_id)
            if bad is None and (rewards := self.bad_reward(e)) is not None:
                bad = f"non-finite reward ({rewards}) in entry {e.entry_id}"
            if bad is not None:  # the step will not be applied
                if not self.lockstep:
                    break
                self.stand_in(e, seed)
                continue
            g = torch.Generator().manual_seed(seed)
            with self.autocast():
                out = self.objective.group_loss(GroupInput(e, self.text(e.prompt), g), self.replay)
            if self.lockstep and not out.loss.requires_grad:  # a group without replay (no reward variance)
                self.stand_in(e, seed)
            if not torch.isfinite(out.loss.detach()):
                bad = f"non-finite loss ({float(out.loss.detach())}) in entry {e.entry_id}"
                if not self.lockstep:
                    break
                out.loss = out.loss * 0  # this group's passes still run (its gradient is not applied)
            if out.loss.requires_grad:
                (out.loss / (global_batch * self.cfg.optim.accum)).backward()
                if bad is None and not self.grads_finite():  # finite before this group's backward: its gradient
                    bad = f"non-finite gradient from entry {e.entry_id}"
                    if not self.lockstep:
                        break
            if bad is not None:
                continue
            for k, v in {"loss": float(out.loss.detach()), **out.stats}.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += 1
        keys = sorted({"loss", "zero_variance", *self.objective.stat_keys})  # the same on every rank
        totals = torch.tensor([sums.get(k, [0.0, 0.0]) for k in keys] + [[float(bad is not None), 0.0]],
                              dtype=torch.float64)  # fmt: skip
        if self.world > 1:
            totals = all_reduce(totals)  # every rank learns of a non-finite value anywhere, and stops with it
        if totals[-1, 0] > 0:
            where = bad or f"non-finite values on {int(totals[-1, 0])} other rank(s)"
            raise NonFiniteError(f"update {step + 1}: {where}: training stopped before this update; "
                                 "the checkpoints written so far are kept (fix the data, then --resume)")  # fmt: skip
        totals = totals[:-1]
        stats = {k: float(s_ / max(n, 1.0)) for k, (s_, n) in zip(keys, totals.tolist(), strict=True)}
        stats["zero_variance_groups"] = float(totals[keys.index("zero_variance"), 0])
        stats["zero_variance_share"] = stats.pop("zero_variance")  # of this update's groups
        if apply and kl_limit is not None and stats.get("approx_kl", 0.0) > kl_limit:  # the same on every rank
            self.opt.zero_grad(set_to_none=True)
            stats["kl_stop"] = 1.0
            return stats
        if apply:
            if self.world > 1:
                all_reduce_grads(self.params)
            o = self.cfg.optim
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip))
            if not math.isfinite(stats["grad_norm"]):  # the same on every rank (reduced)
                names = ", ".join(e.entry_id for e in groups)
                raise NonFiniteError(f"update {step + 1}: non-finite gradient norm of the batch ({names}): "
                                     "training stopped before this update; the checkpoints written so far are kept")
            lr = lr_at(step, o.lr, self.cfg.schedule.warmup)
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            stats["lr"] = lr
            self.objective.after_step(step + 1, stats)  # same global stats on every rank: same updates
        return stats

    def stand_in(self, e: Entry, seed: int) -> None:
        """--shard-base: the model passes (forwards, backward) of a group with a replay, for a group that has
        none here; its loss times zero adds nothing to the gradient (see :func:`~.shard.stand_in`)."""
        with self.autocast():
            out = self.objective.group_loss(
                GroupInput(stand_in(e), self.text(e.prompt), torch.Generator().manual_seed(seed)), self.replay
            )
        (out.loss * 0).backward()

    @torch.no_grad()
    def evaluate(self, prompts: tuple[str, ...], seed: int) -> dict[str, float]:
        """Mean composite and per-reward values of one fresh video per prompt (seeds seed, seed+1, ...)."""
        reward = reward_of(self.cfg.rollouts, hold=self.reward_hold, load=True)
        scores = score_policy(self.policy, prompts, [seed + i for i in range(len(prompts))], reward)
        out = {f"eval_{k}": float(v.mean()) for k, v in scores.items()}
        if len(prompts) > 1:  # the curve's 95% interval (bootstrap over the evaluated videos)
            out["eval_composite_ci_low"], out["eval_composite_ci_high"] = bootstrap_ci(scores["composite"], 1000)
        return out


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


def policy_text(m: ModelSection) -> str:
    """The policy of a model section in words (base checkpoint + shipped LoRA), as adapters record it."""
    model = ModelConfig.load(m.config)
    lora = shipped_lora(model, m.base_lora)
    alpha = m.base_lora_alpha if m.base_lora_alpha is not None else (model.lora.alpha if model.lora else None)
    return describe_policy(base_checkpoint(model, m.checkpoint), lora, alpha if lora is not None else None)


def init_policy_id(cfg: TrainConfig) -> str:
    """The policy id of the run's starting point with ``--init-adapter`` (base + shipped LoRA + that adapter):
    a buffer collected with it is this run's own."""
    m = cfg.model
    model = ModelConfig.load(m.config)
    checkpoint, lora = base_checkpoint(model, m.checkpoint), shipped_lora(model, m.base_lora)
    return policy_id(checkpoint, cfg.lora.init_adapter, None, lora, m.base_lora_alpha)


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
