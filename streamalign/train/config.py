"""Training run configuration: nested sections (model, LoRA, objective, data, rollouts, optimiser,
schedule, logging, hardware), saved next to the run as ``run.yaml`` and accepted back by ``--run-config``.

Flat keywords are routed to their section: ``TrainConfig(mode="semi", buffer="buf", lr=1e-4)``.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from ..adapters.lora import LoraSettings
from ..buffer.formats import FormatName
from ..buffer.urls import local_path
from ..schemas.config import ModelConfig
from ..schemas.run import RUN_FILE, RunConfig, Section, arg, read_run_file
from ..schemas.sections import (
    CacheSection,
    Hardware,
    ModelSection,
    PromptSection,
    RewardSection,
    RoutingSection,
    absolute_fields,
)
from .objectives import OBJECTIVES
from .objectives.copo import CoPOConfig
from .replay import CONTEXT_MODES

ObjectiveSpec = Annotated[typing.Union[tuple(OBJECTIVES.values())], Field(discriminator="name")]  # noqa: UP007


class LoraSection(Section):
    """LoRA"""

    lora_rank: int = arg(64, "LoRA rank.")
    lora_alpha: float = arg(128.0, "LoRA alpha.")
    init_adapter: str | None = arg(None, "Continue training this peft adapter.")

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: typing.Any) -> typing.Any:
        return absolute_fields(data, ("init_adapter",))


class SemiData(Section):
    """Data (semi-on-policy)"""

    buffer: str | None = arg(None, "Replay buffer folder (semi).")
    shuffle: int = arg(64, "Shuffle window of the buffer reader, in groups.")
    filter: str | None = arg(None, "SQL over `manifest` returning entry_id (semi).")
    reward_weights: dict[str, float] | None = arg(None, "Re-weight rewards at read time: a=1,b=0.5.")
    context: Literal[CONTEXT_MODES] = arg("recompute", "Prefix KV: recompute | stored.")
    skip_damaged: bool = arg(False, "Skip (and count) shards failing their manifest checksum instead of stopping.")

    @model_validator(mode="before")
    @classmethod
    def _weights(cls, data: typing.Any) -> typing.Any:
        if isinstance(data, dict) and isinstance(data.get("reward_weights"), str):
            data = {**data, "reward_weights": parse_weights(data["reward_weights"])}
        return data


class Rollouts(PromptSection, RewardSection, RoutingSection):
    """Rollouts (on-policy)"""

    group_size: int = arg(12, "Branches per fresh group (on).", short="-G")
    strength: float = arg(0.5, "Pivot noise perturbation strength (on).", flag="--sigma")
    updates_per_iter: int = Field(2, gt=0, description="Updates per fresh batch (on).")
    format: FormatName = arg("webdataset", "Shard format of the on-policy rollouts buffer.")
    clip_chunks: int | None = arg(None, "Streaming (on): score the clip from the pivot.")


class Optim(Section):
    """Optimiser"""

    lr: float = arg(1e-5, "AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    batch_groups: int = Field(8, gt=0, description="Fork groups per update, over all ranks.")
    accum: int = Field(1, gt=0, description="Batches accumulated per update.")


class Schedule(Section):
    """Schedule"""

    steps: int = Field(100, gt=0, description="Updates (semi) or iterations (on).")
    warmup: int = Field(0, ge=0, description="Linear warm-up updates.")


class Logging(Section):
    """Logging"""

    save_every: int = Field(50, gt=0, description="Checkpoint every N updates (semi) / iterations (on).")
    eval_every: int = Field(0, ge=0, description="Score fresh videos every N updates (0: never).")
    eval_count: int = Field(16, ge=1, description="Training prompts scored at each evaluation.",
                            json_schema_extra={"flag": "--eval-prompts"})  # fmt: skip
    eval_prompts: tuple[str, ...] = arg((), "The prompts scored (default: --eval-prompts of the training prompts).",
                                        flag="--eval-prompt-file", lines=True)  # fmt: skip
    eval_seed: int = arg(1_000_000, "First seed of the evaluation videos.")
    wandb: bool = arg(False, "Also log to Weights & Biases (WANDB_PROJECT / WANDB_MODE honoured).")


class TrainHardware(Hardware):
    """Hardware"""

    # autocast auto = bf16 on CUDA, off on CPU (bf16 forces CPU autocast too, for checks); LoRA weights and
    # the optimizer stay fp32 whatever --dtype the frozen base weights take
    autocast: Literal["auto", "bf16", "off"] = arg("auto", "auto (bf16 on CUDA) | bf16 | off.")
    # memory of the update: replay rows in micro-batches (gradients accumulated: the same update to float
    # rounding) and activation checkpointing per transformer block; both leave a CPU run's numbers as
    # they were by default (every row of a small model in one batch, no checkpointing)
    replay_batch: int | None = arg(None, "Replay rows per forward/backward (default: from the memory budget).")
    checkpointing: Literal["auto", "on", "off"] = arg("auto", "Activation checkpointing per block: auto (on CUDA) "
                                                      "| on | off.")  # fmt: skip
    # the old policy's predictions of the replayed rows (docs/numerics.md): recomputed under this run's numerics
    # (one more forward per group, no grad) or read from the buffer; auto recomputes unless both the
    # buffer's latents and this run's compute are float32 (where the stored ones are reproduced exactly)
    old_predictions: Literal["auto", "recompute", "stored"] = arg("auto", "Old-policy predictions of the replayed "
                                                                  "rows: auto | recompute | stored.")  # fmt: skip
    # a frozen base too big to replicate: FSDP2 shards it over the ranks (per block + root), the LoRA stays
    # replicated and is reduced as without; every rank then runs the same model passes (see train/shard.py)
    shard_base: bool = arg(False, "Shard the frozen base weights over the ranks with FSDP2 (torchrun, --mode semi).")

    def resolved(self, device_type: str) -> tuple[bool, bool]:
        """(bf16 autocast, activation checkpointing) on a device of `device_type` ('cuda', 'cpu')."""
        cuda = device_type == "cuda"
        auto = {"auto": cuda, "bf16": True, "on": True, "off": False}
        return auto[self.autocast], auto[self.checkpointing]


class TrainConfig(RunConfig):
    mode: Literal["semi", "on"] = arg("semi", "semi: stream --buffer; on: fresh rollouts + K updates each.")
    seed: int = arg(0, "Seed of the LoRA init, data order and anchors.")
    model: ModelSection = ModelSection()
    cache: CacheSection = CacheSection()
    lora: LoraSection = LoraSection()
    objective: ObjectiveSpec = arg(CoPOConfig(), "Objective: " + " | ".join(OBJECTIVES) + ".")
    data: SemiData = SemiData()
    rollouts: Rollouts = Rollouts()
    optim: Optim = Optim()
    schedule: Schedule = Schedule()
    logging: Logging = Logging()
    hardware: TrainHardware = TrainHardware()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not 0 < self.optim.lr <= 1:
            raise ValueError(f"--lr {self.optim.lr} is out of range (0, 1]")
        if self.mode == "semi" and self.data.buffer is None:
            raise ValueError("--mode semi needs --buffer DIR (a buffer written by `streamalign collect`)")
        if self.mode == "semi" and getattr(self.objective, "target_kl", None) is not None:
            raise ValueError("--target-kl stops an on-policy iteration's updates: use it with --mode on (semi "
                             "measures the KL to the fixed reference, which grows over the whole run)")  # fmt: skip
        if self.mode == "on" and not 2 <= self.rollouts.group_size <= 256:
            raise ValueError(f"--group-size {self.rollouts.group_size} must lie in 2..256 (advantages need >= 2)")
        if self.hardware.replay_batch is not None and self.hardware.replay_batch < 1:
            raise ValueError(f"--replay-batch {self.hardware.replay_batch} must be >= 1 (or omit it: automatic)")
        LoraSettings(self.lora.lora_rank, self.lora.lora_alpha).check()
        if self.hardware.shard_base and (self.mode == "on" or self.logging.eval_every):
            raise ValueError("--shard-base runs the updates of --mode semi only (rollouts and --eval-every would "
                             "need the same model passes on every rank): drop --mode on / --eval-every")  # fmt: skip
        if self.hardware.shard_base and self.hardware.compile:
            # FSDP2 swaps each block's parameters between shards and gathered tensors around every forward
            raise ValueError("--compile is not supported with --shard-base: drop one of them")
        return self

    def resolve(self) -> TrainConfig:
        """Fill what the model's world provides: on-policy prompts and rewards, evaluation prompts."""
        from ..worlds import default_prompts, default_rewards

        model = ModelConfig.load(self.model.config)
        ro = self.rollouts
        # a buffer's recorded run is read where the buffer is local (a path or file://; over other URLs the
        # rewards are given with --rewards)
        local = local_path(self.data.buffer) if self.mode == "semi" else None
        recorded = local is not None and (local / RUN_FILE).is_file()
        if recorded and (cache := buffer_cache(local, self.cache, model)) != self.cache:
            return self.replace(cache=cache).resolve()
        if recorded and self.logging.eval_every and not (ro.rewards or ro.rewards_from):
            return self.replace(rewards_from=str(local)).resolve()  # the rewards the buffer was scored by
        changes: dict = {}
        needs_prompts = self.mode == "on" or (self.logging.eval_every and not self.logging.eval_prompts)
        texts = default_prompts(model, self.rollouts.prompts, self.rollouts.prompt_set) if needs_prompts else None
        if self.mode == "on":
            rewards, metrics = default_rewards(model, self.rollouts.rewards, self.rollouts.metrics)
            changes.update(prompts=texts, rewards=rewards, metrics=metrics)
        if self.logging.eval_every and not self.logging.eval_prompts:
            n = self.logging.eval_count
            changes["eval_prompts"] = texts[:: max(1, len(texts) // n)][:n]
        if self.logging.eval_every and self.mode == "semi":
            rewards, metrics = default_rewards(model, self.rollouts.rewards, self.rollouts.metrics)
            changes.update(rewards=rewards, metrics=metrics)
        return self.replace(**changes) if changes else self


def buffer_cache(buffer: Path, cache: CacheSection, model: ModelConfig) -> CacheSection:
    """The cache policy of a semi run on `buffer`: the one its groups were rolled out under (its run.yaml's
    ``cache``), which their pivots are replayed under; `cache` (the flags) when the buffer records none.
    Flags that set another policy are refused in one line naming both."""
    recorded = read_run_file(buffer / RUN_FILE).get("cache")
    if not isinstance(recorded, dict):
        return cache
    rec = CacheSection(sink=recorded.get("sink"), window=recorded.get("window"))
    if cache.sink is None and cache.window is None:
        return rec
    given = CacheSection.of(cache.apply(model))
    if given != CacheSection.of(rec.apply(model)):
        raise ValueError(f"--sink {given['sink']} --window {given['window']}: buffer {buffer} was collected with "
                         f"--sink {rec.sink} --window {rec.window}, which its pivots are replayed under: drop "
                         "--sink/--window or give the buffer's")  # fmt: skip
    return cache


def parse_weights(spec: str | None) -> dict[str, float] | None:
    """'a=1,b=0.5' -> {'a': 1.0, 'b': 0.5}."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, sep, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--reward-weights: {part!r} is not name=number") from None
        if not sep or not name.strip():
            raise ValueError(f"--reward-weights: {part!r} is not name=number")
    return out
