"""Memory of training: bytes autograd saves (exact, on real tensors) and the peak of one real update at full
size on fake tensors (:func:`train_update_memory`, what ``plan`` reports for the ``train`` stage).

The update planned is the steady state, the largest of a run: every update after the first holds AdamW's
moments (``exp_avg``, ``exp_avg_sq``: two float32 copies of the LoRA) through its replay, where the first
update allocates them only in its optimizer step, after the replay's peak."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models.autocast_rules import cuda_rules_if
from ..models.memory import (
    CUDA_WORKSPACES,
    GiB,
    HostLogic,
    LiveBytes,
    MemoryReport,
    materialize_fake,
    measure,
    meta_generator,
)
from ..pipeline import Pipeline
from ..schemas.buffer import Entry
from ..schemas.config import ModelConfig
from .config import TrainConfig
from .trainer import Trainer

SIMULATED = "(simulated)"  # the buffer and policy names of a simulated update


class SavedBytes:
    """Sum of the bytes of tensors autograd saves for backward inside the context (each storage counted
    once; the model's own weights, held either way, excluded)::

        with SavedBytes(model) as m:
            loss = model(x).sum()
        m.total
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.total = 0

    def __enter__(self) -> SavedBytes:
        self.total, self.seen = 0, set(self.weights)

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.seen:
                self.seen.add(ptr)
                self.total += t.untyped_storage().nbytes()
            return t

        self.ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.__exit__(*exc)


@dataclass
class FixedText:
    """A text encoder that returns one given embedding [1, L, D] for any prompt (simulated updates)."""

    embedding: torch.Tensor

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.embedding


def simulated_entry(
    cfg: ModelConfig, pivot: int, group_size: int, fork: str, dtype: torch.dtype = torch.float32
) -> Entry:
    """A full-size fork group of `cfg` at `pivot` with real random host tensors in `dtype` and distinct
    rewards: what a training update reads from a buffer. (float32: the update's own float32 copy of a
    bf16 entry is host memory, which the device peak must not count.)"""
    g = torch.Generator().manual_seed(pivot)
    c, lat, n = cfg.sampler.chunk_frames, cfg.latent, cfg.num_chunks
    chw = (lat.channels, lat.height, lat.width)
    t = len(cfg.sampler.denoising_steps)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dtype)

    x_t = rand(group_size, t, c, *chw)
    if fork == "solver":  # the branches share the pivot's initial noise
        x_t[:, 0] = x_t[0, 0]
    rewards = torch.randn(group_size, generator=g)
    return Entry(
        context=rand(pivot * c, *chw), eps_star=rand(c, *chw), branch_noise=x_t[:, 0].clone(),
        init_noise=rand(n, c, *chw), solver_noise=rand(n, t - 1, c, *chw), x_t=x_t, x0_old=rand(group_size, t, c, *chw),
        branch_latents=rand(group_size, (n - pivot) * c, *chw), entry_id=f"{SIMULATED}-{pivot}", run_id=SIMULATED,
        policy_id=SIMULATED, seed=pivot, prompt=SIMULATED, prompt_id=SIMULATED, config_name=cfg.name,
        arch_id=cfg.arch_id, num_chunks=n, pivot=pivot, strength=0.5, timesteps=[0.0] * t,
        rewards={"primary": rewards, "aux": rewards.flip(0)}, reward_weights={"primary": 1.0, "aux": 0.5},
    ).validate(SIMULATED)  # fmt: skip


def frozen_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s frozen (base) weights."""
    return sum(p.untyped_storage().nbytes() for p in module.parameters() if not p.requires_grad)


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors of `opt`'s state (AdamW: ``exp_avg``, ``exp_avg_sq`` and the step counter per parameter)."""
    return [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def held_tensors(trainer: Trainer, text: torch.Tensor) -> list[torch.Tensor]:
    """What a trainer holds on its device between updates: the weights (base and LoRA), the objective's policy
    copies (NFT), the old policies' LoRA values (the base's, for recomputed old predictions), the optimizer's
    state (from the first step on) and the prompt embedding `text`."""
    state = trainer.objective.state_dict()
    old = [t for values in trainer.old.weights.values() for t in values]
    return [*trainer.model.parameters(), *trainer.model.buffers(), text, *(state[0].values() if state else ()),
            *old, *optimizer_tensors(trainer.opt)]  # fmt: skip


def update_memory(
    trainer: Trainer, entry: Entry, text: torch.Tensor, flops: bool = False, tracker: LiveBytes | None = None,
    step: int = 0,
) -> MemoryReport:  # fmt: skip
    """Peak bytes of ``trainer.update`` (update number `step`, 0-based) on one group `entry` (prompt embedding
    `text`), real or fake tensors alike: what the trainer holds (:func:`held_tensors`: after a first update
    the optimizer's moments too) counted from the start."""
    held = held_tensors(trainer, text)
    _, report = measure(lambda: trainer.update(step, [entry], 1), track=held, flops=flops, tracker=tracker)
    return report


def prime_optimizer(trainer: Trainer) -> None:
    """The optimizer state a first update leaves (AdamW's moments and step counter per LoRA parameter), made
    by one real ``step`` on zero gradients; the gradients are then dropped, as the next update's
    ``zero_grad(set_to_none=True)`` drops them. Under a fake mode the moments are fake (no bytes)."""
    for p in trainer.params:
        p.grad = torch.zeros_like(p)
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)


def fake_old_policies(trainer: Trainer) -> None:
    """The old policies' LoRA values (built on the meta device with the LoRA) as fake device tensors of the
    current fake mode: on a GPU they are device tensors, held through every update."""
    for pid, values in trainer.old.weights.items():
        trainer.old.weights[pid] = [torch.empty(v.shape, dtype=v.dtype, device="cpu") for v in values]


def train_update_memory(
    model: ModelConfig | str,
    settings: TrainConfig | None = None,
    pivot: int = 0,
    group_size: int = 12,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    text_tokens: int | None = None,
    device_memory: int | None = None,
    flops: bool = False,
    steady: bool = True,
) -> MemoryReport:
    """Peak device bytes of ONE real training update at `model`'s full size, measured on fake tensors.

    The real :meth:`~streamalign.train.trainer.Trainer.update` runs (the objective's replay of one fork group
    at `pivot` with G = `group_size`, backward, gradient clip, AdamW step) with `settings` (default: the
    defaults of ``train``) resolved as on a `device` ('cuda' or 'cpu': autocast and activation
    checkpointing 'auto'; on 'cuda' autocast casts by CUDA's rules, :mod:`~streamalign.models.autocast_rules`,
    and FlashAttention's backward scratch counts, :data:`~streamalign.models.memory.CUDA_WORKSPACES`), on
    generator weights of `dtype` (fake) with the trainable LoRA in float32, a text embedding [1, `text_tokens`
    (default text_len), text_dim] and a full-size entry on the host (real values: rewards, anchors and every
    host-side decision are those of a real run, see :class:`HostLogic`).
    `device_memory`: bytes of the simulated device, which then answers the replay's free-memory query
    (its automatic micro-batch) as CUDA would; default none to ask (the replay's default budget).

    `steady` (default): the update planned is the second (the steady state: AdamW's moments exist from the
    first update's step on, :func:`prime_optimizer`); else the first, whose step allocates them.

    Counted from the start: weights, LoRA, the objective's policy copies, the old policy's LoRA values, the
    text embedding, and (steady) the optimizer's state. Measured: everything the update allocates.
    ``notes`` name the settings."""
    cfg = ModelConfig.load(model) if isinstance(model, str) else model
    settings = settings or TrainConfig(buffer=SIMULATED)
    bf16, checkpointing = settings.hardware.resolved(device)
    settings = settings.replace(
        device="cpu", autocast="bf16" if bf16 else "off", checkpointing="on" if checkpointing else "off"
    )
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    generator = meta_generator(cfg, dtype)
    with mode:
        text = FixedText(torch.zeros(1, text_tokens or cfg.arch.text_len, cfg.arch.text_dim))
    trainer = Trainer(settings, pipeline=Pipeline(cfg, generator, text, None, SIMULATED))  # LoRA on meta
    with mode:  # weights and LoRA become fake in place (the optimizer holds the same parameters)
        materialize_fake(trainer.peft, mode)
        trainer.objective.bind(trainer.params)  # policy copies (NFT) of the fake LoRA
        fake_old_policies(trainer)
    if steady:
        with mode, HostLogic(healthy=True):
            prime_optimizer(trainer)
    entry = simulated_entry(cfg, pivot, group_size, trainer.objective.fork)
    moments = sum(t.untyped_storage().nbytes() for t in optimizer_tensors(trainer.opt))  # held from the start
    tracker = LiveBytes(workspaces=CUDA_WORKSPACES if device == "cuda" else None)  # + fused kernels' scratch
    if device_memory is not None:  # a device of that size: free memory = what the tracker has not counted
        trainer.sampler.free_memory = lambda default: int(0.9 * (device_memory - tracker.current))
    # the update reads device values only for statistics and health checks; bf16 autocast casts as on `device`
    with mode, HostLogic(healthy=True), cuda_rules_if(device):
        report = update_memory(trainer, entry, text.embedding, flops, tracker, step=int(steady))
    report.notes.update(
        model=cfg.name, objective=trainer.objective.name, pivot=pivot, group_size=group_size,
        dtype=str(dtype).removeprefix("torch."), autocast="bf16" if bf16 else "off", checkpointing=checkpointing,
        autocast_rules=device,
        lora_rank=settings.lora.lora_rank, replay_batch=trainer.replay.last_batch, peak_gib=round(report.peak / GiB, 2),
        weights_bytes=frozen_bytes(trainer.model), block_bytes=max(frozen_bytes(b) for b in trainer.model.blocks),
        root_bytes=frozen_bytes(trainer.model) - sum(frozen_bytes(b) for b in trainer.model.blocks),
        lora_bytes=sum(p.untyped_storage().nbytes() for p in trainer.params), steady=steady,
        optimizer_bytes=moments, workspace_bytes=tracker.workspace,
    )  # fmt: skip
    return report
