"""Memory of one training update at full size (wan-1.3b / wan-14b, 480x832, 81 frames, bf16 weights, bf16
autocast, LoRA r64, default settings as on CUDA: activation checkpointing, automatic replay batch), measured
by running the real Trainer.update on fake tensors; the simulation itself checked against real tensors."""

from __future__ import annotations

import pytest
import torch

from streamalign.models import attention
from streamalign.models.autocast_rules import cuda_autocast_rules
from streamalign.models.kv_cache import kv_bytes
from streamalign.models.memory import GiB, fake_sampler
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig
from streamalign.train.loop import Trainer
from streamalign.train.memory import SIMULATED, FixedText, simulated_entry, train_update_memory, update_memory
from tests.conftest import make_model

LIMIT_GIB = {"wan-1.3b": 40, "wan-14b": 120}
SLOW = pytest.mark.slow  # 40 fake layers of 5120 wide, several micro-batches: minutes on 2 cores


@pytest.mark.parametrize(
    "name,pivot,objective",
    # the default run keeps CoPO (the 16-row update) at wan-1.3b, pivot 6 (the prefix's K/V beside the update);
    # pivot 0, NFT, SDE-GRPO and wan-14b are slow (minutes)
    [
        pytest.param(name, pivot, objective, marks=() if (name, pivot, objective) == ("wan-1.3b", 6, "copo") else SLOW)
        for name in ("wan-1.3b", "wan-14b")
        for pivot in (0, 6)
        for objective in ("copo", "nft", "sde-grpo")
    ],
)
def test_fullsize_train_update_peak(name, pivot, objective, record_property):
    """One update of one G=12 group with the DEFAULT settings (CoPO: 4 anchors x 4 steps = 16 rows; NFT: 12
    branches; SDE-GRPO: 4 branches x 3 transitions) stays under the limit, and above what must be held:
    the weights, the LoRA with its gradient and AdamW moments, the batch-1 prefix KV."""
    cfg = ModelConfig.load(name)
    report = train_update_memory(cfg, TrainConfig(buffer=SIMULATED, objective=objective), pivot=pivot)
    notes = report.notes
    a, c = cfg.arch, cfg.sampler.chunk_frames
    prefix = kv_bytes(a.num_layers, pivot * c, cfg.tokens_per_frame, a.num_heads, a.head_dim, torch.bfloat16)
    must_hold = notes["weights_bytes"] + notes["lora_bytes"] + max(prefix, 3 * notes["lora_bytes"])
    print(f"{name} {objective} pivot {pivot}: {report}; replay batch {notes['replay_batch']}")
    record_property("peak_gib", notes["peak_gib"])
    assert notes["checkpointing"] and notes["autocast"] == "bf16" and notes["lora_rank"] == 64
    assert must_hold <= report.peak <= LIMIT_GIB[name] * GiB


@SLOW  # two full-width updates per model: minutes on 2 cores
@pytest.mark.parametrize("name", ["wan-1.3b", "wan-14b"])
def test_replay_row_bytes_bounds_what_one_more_row_costs(name):
    """The automatic replay batch rests on Sampler.replay_row_bytes: at full width and tokens per frame (2
    chunks of 480x832 latents, pivot 1, checkpointing), one more row in the batch costs no more than it
    estimates, and not much less (the estimate is what sizes real micro-batches)."""
    cfg = ModelConfig.load(name).with_overrides(latent={"frames": 6})

    def peak(rows: int) -> int:  # CoPO with one pivot step: one row per anchor
        settings = TrainConfig(buffer=SIMULATED, objective="copo", anchors=rows, pivot_steps=1)
        report = train_update_memory(cfg, settings, pivot=1, group_size=4)
        assert report.notes["replay_batch"] == rows
        return report.peak

    slope = peak(2) - peak(1)
    sampler = fake_sampler(cfg)[0]
    sampler.model.gradient_checkpointing = True
    estimate = sampler.replay_row_bytes(1)
    print(f"{name}: one more replay row costs {slope / GiB:.3f} GiB, estimated {estimate / GiB:.3f} GiB")
    assert 0.8 * estimate < slope <= estimate


def reduced() -> ModelConfig:
    base = ModelConfig.load("tiny")
    arch = {**base.arch.model_dump(), "dim": 128, "ffn_dim": 256, "num_heads": 4, "num_layers": 2}
    return base.with_overrides(arch=arch, latent={"height": 16, "width": 16, "frames": 12})


@pytest.mark.parametrize(
    "objective,replay_batch,merge,rows",
    [("copo", None, False, 16), ("copo", 5, True, 5), ("sde-grpo", 5, False, 5)],
    ids=["copo-one-batch", "copo-micro-batches-merged-prefix", "sde-grpo-micro-batches"],
)
def test_simulated_update_equals_a_real_one(objective, replay_batch, merge, rows, monkeypatch):
    """Reduced width, the same Trainer.update: the planned steady state on fake tensors (host logic real, see
    HostLogic) equals the peak of a real trainer's SECOND update on real tensors (AdamW's moments and the old
    policy's LoRA held from its start, tracked), with micro-batches, checkpointing and bf16 autocast, and on
    the LSE-merged prefix path full-size prefixes take; both under CUDA's autocast rules."""
    if merge:
        monkeypatch.setattr(attention, "MERGE_MIN_BYTES", 0)
    cfg = reduced()
    settings = TrainConfig(buffer=SIMULATED, objective=objective, replay_batch=replay_batch, lora_rank=8)
    fake = train_update_memory(cfg, settings, pivot=2, group_size=6, flops=True)
    real_settings = settings.replace(device="cpu", autocast="bf16", checkpointing="on")
    text = torch.zeros(1, cfg.arch.text_len, cfg.arch.text_dim)
    model = make_model(cfg).to(torch.bfloat16).requires_grad_(False)
    trainer = Trainer(real_settings, pipeline=Pipeline(cfg, model, FixedText(text), None, SIMULATED))
    entry = simulated_entry(cfg, 2, 6, trainer.objective.fork)
    with cuda_autocast_rules():  # bf16 autocast casts as CUDA's does (the plan's rules)
        trainer.update(0, [entry], 1)  # the first update: it moves the LoRA (the old forward runs), makes the moments
        assert len(trainer.opt.state) == len(trainer.params)
        real = update_memory(trainer, entry, text, flops=True, step=1)
    assert trainer.replay.last_batch == fake.notes["replay_batch"] == rows
    assert fake.peak == real.peak and fake.baseline == real.baseline
    assert fake.flops == real.flops > 0  # forward, recomputation and backward alike
    assert all(p.grad is not None for p in trainer.params)  # the real update did update


def test_the_steady_state_holds_the_optimizer_moments():
    """The planned update is the steady state: its peak is the first update's plus AdamW's two float32 moments
    of every LoRA parameter (and its step counters), which the first update makes only after its replay."""
    cfg = reduced()
    settings = TrainConfig(buffer=SIMULATED, objective="copo", lora_rank=8)
    first = train_update_memory(cfg, settings, pivot=2, group_size=6, steady=False)
    steady = train_update_memory(cfg, settings, pivot=2, group_size=6)
    text = torch.zeros(1, cfg.arch.text_len, cfg.arch.text_dim)
    trainer = Trainer(settings.replace(device="cpu"), pipeline=Pipeline(cfg, make_model(cfg), FixedText(text), None,
                                                                       SIMULATED))  # fmt: skip
    moments = 2 * steady.notes["lora_bytes"] + 4 * len(trainer.params)  # + one float32 step counter each
    assert steady.notes["optimizer_bytes"] == moments and first.notes["optimizer_bytes"] == 0
    assert steady.baseline - first.baseline == moments
    assert steady.peak - first.peak == moments


def test_a_simulated_device_sizes_the_replay_batch():
    """With `device_memory`, the replay asks the simulated device for its free memory as it asks CUDA's:
    a large device runs the 4 rows at once, one with nothing free runs them one by one."""
    cfg = reduced()
    settings = TrainConfig(buffer=SIMULATED, objective="copo", pivot_steps=1, lora_rank=8)
    big = train_update_memory(cfg, settings, pivot=1, group_size=6, device_memory=2**40)
    full = train_update_memory(cfg, settings, pivot=1, group_size=6, device_memory=0)
    assert big.notes["replay_batch"] == 4 and full.notes["replay_batch"] == 1
    assert full.peak < big.peak
