"""The training loops: semi-on-policy (stream a replay buffer) and on-policy (collect, then K updates).

Both run the same update: every group of the batch goes through the objective one at a time (memory of
one group), its loss divided by the global batch, gradients summed over ranks (torch.distributed
all-reduce under torchrun), clipped, one AdamW step. Random choices inside the objective come from a
generator seeded by (seed, step, entry id), so they do not depend on rank or batch order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from ..buffer.manifest import read_manifest
from ..buffer.reader import BufferReader
from ..collect.collector import CollectConfig, collect
from ..collect.distributed import rank_and_world
from ..collect.policy import Policy
from ..evaluate.scoring import score_policy
from ..models.noise import derive_seed
from ..models.sampler import Sampler
from ..rewards import CompositeReward
from ..schemas.buffer import Entry, SchemaError
from .config import TrainConfig
from .lora import LoraSettings, attach_lora, load_lora, lora_parameters, save_lora
from .metrics import MetricsLog, plot_metrics
from .objectives.base import GroupInput, Objective
from .objectives.copo import CoPO
from .objectives.sde_grpo import SDEGRPO
from .replay import PivotReplay
from .state import Progress, latest_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger("streamalign.train")


def make_objective(cfg: TrainConfig) -> Objective:
    """The configured objective (its settings are checked by TrainConfig)."""
    if cfg.objective == "nft":
        return cfg.nft()
    if cfg.objective == "sde-grpo":
        return SDEGRPO(cfg.anchors, cfg.clip_eps, cfg.clip)
    return CoPO(cfg.anchors, cfg.pivot_steps, cfg.tau, cfg.tau_scale, cfg.clip_eps, cfg.clip)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup` updates, then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr


def resolve_device(spec: str) -> torch.device:
    """'auto': cuda:LOCAL_RANK when CUDA is available (one GPU per torchrun rank), else cpu."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine (use cpu or auto)")
    return torch.device(spec)


def entry_seed(seed: int, step: int, entry_id: str) -> int:
    return derive_seed(seed, 9, step, int(hashlib.sha256(entry_id.encode()).hexdigest()[:12], 16))


@dataclass
class TrainSummary:
    steps: int
    seconds: float
    adapter: Path
    final: dict


class Trainer:
    """Policy with a trainable LoRA, its optimizer and the shared update step."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = resolve_device(cfg.device)
        self.bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        base = Policy.load(cfg.model, cfg.checkpoint, wan_dir=cfg.wan_dir, device=str(self.device))
        if cfg.init_adapter is not None:
            self.peft = load_lora(base.model, cfg.init_adapter, trainable=True)
        else:
            self.peft = attach_lora(base.model, LoraSettings(cfg.lora_rank, cfg.lora_alpha), seed=cfg.seed)
        self.model = self.peft.base_model.model  # the CausalWanModel, LoRA layers injected
        self.model.train()
        self.policy = Policy(base.config, self.model, base.text, base.codec, base.policy_id)
        self.sampler = Sampler(self.model, base.config)
        self.replay = PivotReplay(self.sampler, cfg.context)
        self.objective = make_objective(cfg)
        self.params = [p for _, p in lora_parameters(self.peft)]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if hasattr(self.objective, "bind"):  # objectives with policy copies (NFT: old and reference)
            self.objective.bind(self.params)
        self._text: dict[str, torch.Tensor] = {}

    def text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text:
            with torch.no_grad():
                self._text[prompt] = self.policy.text.encode([prompt])
        return self._text[prompt]

    def check_entry(self, e: Entry) -> None:
        c = self.policy.config
        if e.arch_id != c.arch_id or e.num_chunks != c.num_chunks:
            raise SchemaError(
                f"entry {e.entry_id} was collected with model config {e.config_name!r} (arch {e.arch_id}), "
                f"not {c.name!r} (arch {c.arch_id}): train with the buffer's --config"
            )

    def update(self, step: int, groups: list[Entry], global_batch: int, zero: bool = True, apply: bool = True) -> dict:
        """Accumulate the objective over this rank's `groups`; with `apply`, reduce and step. Returns stats
        averaged over every rank's groups."""
        if zero:
            self.opt.zero_grad(set_to_none=True)
        sums: dict[str, list[float]] = {}  # key -> [sum, groups that reported it]
        for e in groups:
            self.check_entry(e)
            g = torch.Generator().manual_seed(entry_seed(self.cfg.seed, step, e.entry_id))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = self.objective.group_loss(GroupInput(e, self.text(e.prompt), g), self.replay)
            if out.loss.requires_grad:
                (out.loss / (global_batch * self.cfg.accum)).backward()
            for k, v in {"loss": float(out.loss.detach()), **out.stats}.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0] += v
                acc[1] += 1
        keys = sorted({"loss", "zero_variance", *self.objective.stat_keys})  # the same on every rank
        totals = torch.tensor([sums.get(k, [0.0, 0.0]) for k in keys], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(totals)
        stats = {k: float(s_ / max(n, 1.0)) for k, (s_, n) in zip(keys, totals.tolist(), strict=True)}
        stats["zero_variance_groups"] = float(totals[keys.index("zero_variance"), 0])
        del stats["zero_variance"]
        if apply:
            if self.world > 1:
                flat = torch.cat(
                    [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params]
                )
                dist.all_reduce(flat)
                i = 0
                for p in self.params:
                    p.grad = flat[i : i + p.numel()].view_as(p).clone()
                    i += p.numel()
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.cfg, step)
            self.opt.step()
            stats["lr"] = lr_at(self.cfg, step)
            if hasattr(self.objective, "after_step"):  # same global stats on every rank: same updates
                self.objective.after_step(step + 1, stats)
        return stats

    @torch.no_grad()
    def evaluate(self, prompts: tuple[str, ...], seed: int) -> dict[str, float]:
        """Mean composite and per-reward values of one fresh video per prompt (seeds seed, seed+1, ...)."""
        reward = CompositeReward.parse(self.cfg.rewards, self.cfg.metrics)
        scores = score_policy(self.policy, prompts, [seed + i for i in range(len(prompts))], reward)
        return {f"eval_{k}": float(v.mean()) for k, v in scores.items()}


def _entries(reader: BufferReader, epoch: int, skip: int):
    """Entries of this rank from (epoch, skip) onward, epoch after epoch: yields (entry, epoch, index)."""
    while True:
        reader.set_epoch(epoch)
        for i, e in enumerate(reader):
            if i >= skip:
                yield e, epoch, i + 1
        epoch, skip = epoch + 1, 0


def _check_buffer(cfg: TrainConfig, trainer: Trainer) -> None:
    table = read_manifest(cfg.buffer)
    if table.num_rows == 0:
        raise ValueError(f"buffer {cfg.buffer} is empty: collect some groups first")
    names = set(table.column("config_name").to_pylist())
    if names != {trainer.policy.config.name}:
        raise ValueError(
            f"buffer {cfg.buffer} holds groups of model config {sorted(names)}, this run uses "
            f"{trainer.policy.config.name!r}: pass the buffer's --config"
        )


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Run the configured loop into `out` (adapter/, checkpoints/, metrics.jsonl, curves.png, train.yaml)."""
    out = Path(out)
    with rank_and_world() as (rank, world):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_groups % world:
            raise ValueError(f"--batch-groups {cfg.batch_groups} is not divisible by the {world} ranks")
        trainer = Trainer(cfg, rank, world)
        if cfg.mode == "semi":
            _check_buffer(cfg, trainer)
        saved = out / "train.yaml"
        if resume and saved.exists():
            old = TrainConfig(**yaml.safe_load(saved.read_text()))
            if old.model_dump(exclude={"steps"}) != cfg.model_dump(exclude={"steps"}):
                raise ValueError(f"--resume: {saved} was written by a different configuration; use a new --out")
        state = Progress()
        ckpt = latest_checkpoint(out) if resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, trainer.peft, trainer.opt, trainer.objective)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        logger = (
            MetricsLog(out, state.step if resume else None, cfg.model_dump(mode="json"), cfg.wandb)
            if rank == 0
            else None
        )
        t0 = time.time()
        total = cfg.steps if cfg.mode == "semi" else cfg.steps * cfg.updates_per_iter
        bar = tqdm(total=total, initial=state.step, desc=f"train[{cfg.mode}]", disable=not progress or rank > 0)
        last: dict = {}

        def finish_step(stats: dict, t_step: float) -> None:
            nonlocal last
            state.step += 1
            row = {"step": state.step, **stats, "step_time_s": round(time.time() - t_step, 4)}
            if cfg.eval_every and (state.step % cfg.eval_every == 0 or state.step == total) and cfg.eval_prompts:
                row.update(trainer.evaluate(cfg.eval_prompts, cfg.eval_seed))
            if logger is not None:
                logger.log(row)
            last = row
            bar.update(1)
            bar.set_postfix(
                loss=f"{stats['loss']:.3g}",
                reward=f"{stats.get('reward', float('nan')):.3f}",
                s=f"{row['step_time_s']:.2f}",
            )

        if cfg.mode == "semi":
            reader = BufferReader(cfg.buffer, rank, world, cfg.shuffle, cfg.seed, cfg.filter, cfg.reward_weights)
            per_rank = cfg.batch_groups // world
            if len(reader) == 0:
                raise ValueError(f"buffer {cfg.buffer} gives rank {rank} of {world} no entries: use fewer ranks")
            stream = _entries(reader, state.epoch, state.consumed)
            while state.step < cfg.steps:
                t_step = time.time()
                stats: dict = {}
                for micro in range(cfg.accum):
                    groups = []
                    for _ in range(per_rank):
                        e, state.epoch, state.consumed = next(stream)
                        groups.append(e)
                    stats = trainer.update(
                        state.step, groups, cfg.batch_groups, zero=micro == 0, apply=micro + 1 == cfg.accum
                    )
                finish_step(stats, t_step)
                if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                    _save(out, trainer, state, rank, world)
        else:
            rollouts = out / "rollouts"
            while state.iteration < cfg.steps:
                it = state.iteration
                ccfg = CollectConfig(
                    prompts=tuple(cfg.prompts), groups=cfg.batch_groups, group_size=cfg.group_size,
                    strength=cfg.strength, seed=derive_seed(cfg.seed, 7, it), format=cfg.format,
                    entries_per_shard=max(1, cfg.batch_groups // world), rewards=cfg.rewards, metrics=cfg.metrics,
                    fork="solver" if cfg.objective == "sde-grpo" else "initial", clip_chunks=cfg.clip_chunks,
                )  # fmt: skip
                trainer.model.eval()
                version = f"{trainer.policy.policy_id}+it{it:05d}"
                rollout_policy = Policy(
                    trainer.policy.config, trainer.model, trainer.policy.text, trainer.policy.codec, version
                )
                collect(rollout_policy, ccfg, rollouts, rank, world, progress=False, shard_prefix=f"it{it:05d}-")
                trainer.model.train()
                if world > 1:
                    dist.barrier()
                where = f"SELECT entry_id FROM manifest WHERE run_id = '{ccfg.run_id}'"
                reader = BufferReader(rollouts, rank, world, shuffle=1, seed=cfg.seed, where=where)
                groups = list(reader)
                for _ in range(cfg.updates_per_iter):
                    t_step = time.time()
                    finish_step(trainer.update(state.step, groups, cfg.batch_groups), t_step)
                state.iteration += 1
                if state.iteration % cfg.save_every == 0 or state.iteration == cfg.steps:
                    _save(out, trainer, state, rank, world)
        bar.close()
        if rank == 0:
            save_lora(trainer.peft, out / "adapter")
            logger.close()
            plot_metrics(out / "metrics.jsonl", out / "curves.png")
            (out / "summary.json").write_text(json.dumps({"steps": state.step, "final": last}, indent=1))
        return TrainSummary(state.step, time.time() - t0, out / "adapter", last)


def _save(out: Path, trainer: Trainer, state: Progress, rank: int, world: int) -> None:
    if rank == 0:
        save_checkpoint(out, trainer.peft, trainer.opt, state, trainer.objective)
    if world > 1:
        dist.barrier()
