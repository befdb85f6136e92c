"""The update every training loop runs: :class:`Trainer` holds the policy (frozen base + LoRA), the old
policy, the objective and AdamW, and does one optimiser step over a global batch of fork groups, each group
through the objective one at a time (memory of one group), its loss divided by the global batch, gradients
summed over ranks, clipped. Random choices inside the objective come from a generator seeded by (seed, step,
entry id) (:func:`entry_seed`), so they do not depend on rank or batch order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math

import torch

from ..adapters.lora import LoraSettings, attach_lora, cast_lora_inputs, load_lora, lora_parameters
from ..distributed import all_reduce, all_reduce_grads
from ..models.checkpoint import shipped_lora
from ..models.kv_cache import compute_dtype
from ..models.noise import derive_seed
from ..models.placement import Placement
from ..models.sampler import Sampler
from ..optim import lr_at
from ..pipeline import Pipeline, base_checkpoint, describe_policy, policy_id, resolve_config
from ..rewards.sources import reward_of
from ..schemas.buffer import Entry, SchemaError
from ..schemas.config import ModelConfig
from ..schemas.sections import ModelSection
from ..scoring import bootstrap_ci, score_policy
from .config import TrainConfig
from .objectives import GroupInput
from .objectives.base import composite_rewards
from .old_policy import OldPolicy, recompute_wanted
from .replay import PivotReplay
from .shard import kept_bytes, shard_base, stand_in

log = logging.getLogger("streamalign.train")


def entry_seed(seed: int, step: int, entry_id: str) -> int:
    return derive_seed(seed, 9, step, int(hashlib.sha256(entry_id.encode()).hexdigest()[:12], 16))


class NonFiniteError(ValueError):
    """A non-finite loss, reward or gradient: the run stops before the optimizer step, so every checkpoint
    written so far (and the parameters) stay finite."""


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
