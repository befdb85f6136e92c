"""Training memory without changing the update: replay rows in micro-batches (gradients accumulated) and
activation checkpointing per block give the gradients of one plain forward/backward, for every objective,
on the shapes model (global cache) and a rolling-window config; the batch follows the memory budget; a
prompt is encoded once; on-policy rollouts run in the updates' precision."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from streamalign.adapters.lora import LoraSettings, attach_lora
from streamalign.collect.collector import collect
from streamalign.models.memory import measure
from streamalign.models.sampler import Sampler
from streamalign.pipeline import Pipeline
from streamalign.schemas.buffer import Entry
from streamalign.schemas.config import ModelConfig
from streamalign.train import loop
from streamalign.train.config import TrainConfig
from streamalign.train.loop import Trainer
from streamalign.train.objectives import GroupInput
from streamalign.train.objectives.copo import CoPO
from streamalign.train.objectives.nft import NFT
from streamalign.train.objectives.sde_grpo import SDEGRPO
from streamalign.train.replay import PivotReplay
from streamalign.worlds.shapes import held_in_prompts
from tests.conftest import make_model, tiny_config

REWARDS = {"r": torch.tensor([0.1, 0.4, 0.2, 0.3, 0.9, 0.0]), "q": torch.tensor([0.5, 0.1, 0.2, 0.3, 0.0, 0.7])}


def _setup(cfg: ModelConfig, pivot: int, fork: str, perturb: bool):
    base = make_model(cfg, seed=3)
    sampler = Sampler(base, cfg)
    text = torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        group = sampler.fork_group(text, sampler.noise_bank(3), pivot, 6, 0.5, fork=fork)
    entry = Entry.from_fork_group(
        group, entry_id="e", run_id="r", policy_id="p", prompt="x", prompt_id="x", config_name=cfg.name,
        arch_id=cfg.arch_id, timesteps=list(sampler.schedule.timesteps), rewards=REWARDS,
        reward_weights={"r": 1.0, "q": 0.5},
    )  # fmt: skip
    peft = attach_lora(base, LoraSettings(rank=4, alpha=8))
    if perturb:  # a policy that moved away from the rollout's: every LoRA factor gets a gradient
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
    model = peft.base_model.model
    return model, entry, text


def _gradients(model, cfg, objective, entry, text, batch, checkpointing):
    """The flat gradient of the trainable weights and the loss of one group, and the rows per forward."""
    model.gradient_checkpointing = checkpointing
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    replay = PivotReplay(Sampler(model, cfg), batch=batch)
    out = objective.group_loss(GroupInput(entry, text, torch.Generator().manual_seed(7)), replay)
    out.loss.backward()
    return torch.cat([p.grad.flatten() for p in params]), out.loss.detach(), replay.last_batch


# Relative gradient error allowed between row batchings (their matmuls round differently in fp32). CoPO's
# per-step temperature (the default) is up to ~5e4x smaller at the last steps than at step 0, where the
# branches nearly coincide, so d / tau magnifies the predictions' rounding: measured up to 1.5e-5 on the
# shapes model, against 1.6e-7 with the pooled temperature (kept at 1e-6 below: the batching itself is exact
# to rounding). SDE-GRPO's transition log-probabilities divide by the step's noise variance, which magnifies
# the same rounding: 7.8e-6 measured on an AMD EPYC host, whose kernels round differently per batch size (0
# on the hosts this was first measured on). Recomputation (checkpointing) stays bit-exact in every case.
TOLERANCE = {"copo-no-clip": 1e-4, "sde-grpo": 5e-5}

CASES = {
    # CoPO's first update (policy == rollout, ratios inside the clip), NFT and SDE-GRPO off the rollout policy
    # (objective, fork, perturbed policy, rows: 4 anchors x 4 steps | G branches | 4 anchors x 3 transitions)
    "copo": (lambda: CoPO(), "initial", False, 16),
    "copo-no-clip": (lambda: CoPO(clip=False), "initial", True, 16),
    "copo-no-clip-pooled": (lambda: CoPO(clip=False, tau_mode="pooled"), "initial", True, 16),
    "nft": (lambda: NFT(kl_w=1.0), "initial", True, 6),
    "sde-grpo": (lambda: SDEGRPO(), "solver", True, 12),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(
    "config,pivot", [("shapes", 0), ("shapes", 2), ("rolling", 3)], ids=["shapes-p0", "shapes-p2", "rolling-p3"]
)
def test_micro_batches_and_checkpointing_give_the_plain_gradient(name, config, pivot):
    cfg = ModelConfig.load("shapes") if config == "shapes" else tiny_config(frames=15, sink=3, window=6)
    make, fork, perturb, rows = CASES[name]
    model, entry, text = _setup(cfg, pivot, fork, perturb)
    objective = make()
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(objective, NFT):
        objective.bind(params)
        with torch.no_grad():  # an old policy that differs from the current one
            objective.old = [p + 0.01 for p in objective.old]
    plain, loss, used = _gradients(model, cfg, objective, entry, text, None, False)
    assert plain.abs().sum() > 0 and used == rows  # every row in one forward by default on a CPU
    checkpointed, loss_c, _ = _gradients(model, cfg, objective, entry, text, None, True)
    assert torch.equal(checkpointed, plain) and torch.equal(loss_c, loss)  # recomputation is exact
    for batch, checkpointing in [(5, False), (2, True)]:
        grad, loss_b, used = _gradients(model, cfg, objective, entry, text, batch, checkpointing)
        assert used == batch
        tol = TOLERANCE.get(name, 1e-6)
        assert float((grad - plain).norm() / plain.norm()) < tol, (batch, checkpointing)
        assert float((loss_b - loss).abs()) <= tol * max(1.0, float(loss.abs()))


def test_micro_batched_rows_equal_one_batch_and_hold_one_micro_batch(tiny, text):
    """predict_rows: micro-batches of 2+ rows give the rows of one batch (to fp32 rounding: a CPU's kernels may
    round differently per batch size, as on AMD EPYC hosts; a row read against the wrong prefix would be off by
    O(1)), leave the prefix as it was, and a forward + backward in micro-batches peaks lower than in one batch."""
    _cfg, model, sampler = tiny
    model.requires_grad_(True)
    prefix = sampler.new_cache(1, 3)
    with torch.no_grad():
        sampler.write_context(prefix, sampler.rollout(text, sampler.noise_bank(2), num_chunks=2), text)
    before = [t.clone() for t in [*prefix.k, *prefix.v]]
    x = torch.randn(8, *sampler.chunk_shape)
    t = torch.tensor(sampler.schedule.timesteps).repeat(2)
    sigma = torch.tensor(sampler.schedule.sigmas, dtype=torch.float64).repeat(2)

    def update(batch):
        model.zero_grad()
        out = sampler.predict_rows(x, t, sigma, text, prefix, 6, batch)
        out.pow(2).mean().backward()
        return out.detach()

    one, one_mem = measure(lambda: update(None), track=[*model.parameters()])
    micro, micro_mem = measure(lambda: update(2), track=[*model.parameters()])
    torch.testing.assert_close(micro, one, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, [*prefix.k, *prefix.v], strict=True)) and prefix.end_frame == 6
    assert micro_mem.peak < one_mem.peak


def test_replay_batch_follows_the_memory_budget(tiny):
    _cfg, model, sampler = tiny
    row = sampler.replay_row_bytes(2)
    assert sampler.auto_replay_batch(16, 2, memory_budget=100 * row) == 16
    assert sampler.auto_replay_batch(16, 2, memory_budget=15 * row) == 8  # two balanced micro-batches
    assert sampler.auto_replay_batch(16, 2, memory_budget=5 * row) == 4
    assert sampler.auto_replay_batch(16, 2, memory_budget=0) == 1
    model.gradient_checkpointing = True  # checkpointing keeps one block's activations, not every block's
    assert sampler.replay_row_bytes(2) < row
    assert sampler.replay_row_bytes(3) > sampler.replay_row_bytes(2)  # a longer prefix: more keys per row


@dataclass
class CountingText:
    """A text encoder that counts its calls (one fixed embedding)."""

    embedding: torch.Tensor
    calls: int = 0

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        return self.embedding


def test_the_prompt_is_encoded_per_group_not_per_replay_row():
    """The trainer asks the text encoder (which caches per process) once per group, never per replay row
    (16 rows per CoPO group here)."""
    cfg = ModelConfig.load("shapes")
    text = CountingText(torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim))
    settings = TrainConfig(buffer="unused", lora_rank=4, lora_alpha=8)
    trainer = Trainer(settings, pipeline=Pipeline(cfg, make_model(cfg, seed=3), text, None, "test"))
    _model, entry, _ = _setup(cfg, 1, "initial", False)
    second = replace(entry, entry_id="e2", seed=4)
    for step in range(2):
        trainer.update(step, [entry, second], 2)
    assert text.calls == 4  # 2 updates x 2 groups


@pytest.mark.parametrize("autocast", ["bf16", "off"])
def test_on_policy_rollouts_run_in_the_updates_precision(tmp_path, monkeypatch, autocast):
    """train --mode on: the fresh groups are collected under the same autocast as the updates (on CUDA by
    default bf16), through the one collect / sampler (branch batches from the same memory budget)."""
    seen = []

    def recording_collect(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return collect(*args, **kwargs)

    monkeypatch.setattr(loop, "collect", recording_collect)
    prompts = tuple(p.text for p in held_in_prompts()[:1])
    cfg = TrainConfig(mode="on", prompts=prompts, steps=1, batch_groups=1, group_size=2, updates_per_iter=1,
                      lora_rank=4, lora_alpha=8, autocast=autocast, threads=1)  # fmt: skip
    loop.train(cfg, tmp_path / "run", progress=False)
    assert seen == [(autocast == "bf16", torch.bfloat16)]


def _replay_with(model, cfg, entry, text, old_cache: bool, monkeypatch):
    """CoPO's loss, flat LoRA gradient and tracked peak of one group, the prefix cache the current one or (
    `old_cache`) the one the replay allocated before: a global cache of pivot + 1 chunks (rolling: its ring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    replay = PivotReplay(Sampler(model, cfg))
    if old_cache:
        monkeypatch.setattr(replay, "prefix_cache", lambda pivot: replay.sampler.new_cache(1, pivot + 1))

    def run():
        out = CoPO().group_loss(GroupInput(entry, text, torch.Generator().manual_seed(7)), replay)
        out.loss.backward()
        return out.loss.detach()

    loss, report = measure(run, track=[*model.parameters()])
    monkeypatch.undo()
    return loss, torch.cat([p.grad.flatten() for p in params]), report.peak


@pytest.mark.parametrize(
    "config,pivot", [("shapes", 0), ("shapes", 2), ("rolling", 0)], ids=["shapes-p0", "shapes-p2", "rolling-p0"]
)
def test_the_replay_prefix_holds_no_chunk_nobody_reads(config, pivot, monkeypatch):
    """The replay's prefix cache holds the pivot's prefix only (at pivot 0 nothing): loss and gradients bit for
    bit those of the cache that also held the pivot chunk (never written: rows do not store), the peak lower by
    exactly that chunk's K/V (rolling at pivot 0: the whole ring), and the predictions equal a slow reference
    (each row alone, through a storing cache of the whole prefix and chunk)."""
    from streamalign.models.kv_cache import kv_bytes

    cfg = ModelConfig.load("shapes") if config == "shapes" else tiny_config(frames=15, sink=3, window=6)
    model, entry, text = _setup(cfg, pivot, "initial", True)
    model.gradient_checkpointing = True  # as on CUDA: each block's recomputation holds its arguments, the cache too
    loss, grad, peak = _replay_with(model, cfg, entry, text, False, monkeypatch)
    old_loss, old_grad, old_peak = _replay_with(model, cfg, entry, text, True, monkeypatch)
    assert torch.equal(loss, old_loss) and torch.equal(grad, old_grad) and grad.abs().sum() > 0
    a, c = cfg.arch, cfg.sampler.chunk_frames
    dead = c if cfg.cache.window is None else cfg.cache.sink + cfg.cache.window
    assert old_peak - peak == kv_bytes(a.num_layers, dead, cfg.tokens_per_frame, a.num_heads, a.head_dim, torch.float32)

    sampler = Sampler(model, cfg)  # the slow reference: one row at a time, a storing cache of prefix + chunk
    replay = PivotReplay(sampler)
    x = entry.x_t[0].float()  # branch 0's step inputs [T, c, C, H, W]
    steps = torch.arange(x.shape[0])
    with torch.no_grad():
        fast = replay.predict(entry, text, x, steps)
        full = sampler.new_cache(1, pivot + 1)
        if pivot:
            sampler.write_context(full, entry.context.unsqueeze(0).float(), text)
        for i in range(x.shape[0]):
            row = sampler.predict_x0(x[i : i + 1], sampler.schedule.timesteps[i], sampler.schedule.sigmas[i], text,
                                     full.clone(), pivot * c)  # fmt: skip
            torch.testing.assert_close(fast[i : i + 1], row, rtol=1e-5, atol=1e-5)
