"""Pre-training of the shapes generator: x0-prediction with clean causal context at the sampler's sigmas.

Each step renders a fresh batch of ground-truth videos of held-in prompts, encodes them with the
pixel codec, noises every chunk to one of the sampler's (warped) sigmas and runs ONE teacher-forcing
pass over ``[clean frames at t=0; noisy frames]`` (see :func:`~streamalign.models.wan.teacher_forcing_mask`):
noisy chunk j attends to the clean chunks < j, exactly what it sees through the KV cache at generation.
The loss is the MSE of the x0 prediction. Everything random derives from ``seed`` and the step index.

Motion-onset augmentation (``late_onset``): from pure noise, a small x0-MSE model's first chunk tends
to come out static, and a model trained only on clean moving context learns to continue the context's
velocity -- zero -- rather than the prompt. A share of training videos therefore holds the shape still
until chunk 1 or 2 and then moves it as prompted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from ...rewards import shapes as shape_rewards
from ...schemas.config import ModelConfig
from ..checkpoint import load_state_dict_strict, read_state_dict, save_safetensors
from ..noise import derive_seed
from ..sampler import Sampler, Schedule
from ..wan import CausalWanModel, teacher_forcing_mask
from .pipeline import ShapesWorld, codec_for, minilm
from .quality import sample_quality
from .world import (
    AREA_PER_R2,
    DIRECTIONS,
    RADIUS_RANGE,
    Motion,
    apply_haze,
    haze_levels,
    held_in_prompts,
    held_out_prompts,
    noise_score,
    path_margin,
    render,
    sample_videos,
)


class PretrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "shapes"
    seed: int = 0
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(100, ge=0)
    final_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema: float = Field(0.999, ge=0, lt=1)
    eval_every: int = Field(250, gt=0)
    eval_videos: int = Field(32, gt=0)
    threads: int = Field(2, gt=0)
    # share of training videos whose shape stays still until a later chunk boundary, then moves: it
    # teaches the model to start moving as prompted when its own first chunk came out static
    late_onset: float = Field(0.3, ge=0, le=1)
    # exposure flicker (see world.haze_levels): chunks trained from pure noise are over-exposed by
    # haze * max(0, 2 Phi(z) - 1) with z the standardised sum of exactly that noise, other chunks by an
    # independent z. The model learns to read its initial noise, as a distilled generator does, so
    # branches of a fork group differ (and the rewards, which all dislike the flicker, tell them apart)
    haze: float = Field(0.0, ge=0, lt=1)
    # self-rollout fine-tuning: start from these weights, and build this share of every batch from the
    # model's own first chunk followed by the prompted motion rendered onward from where it left the shape
    init: str | None = None
    self_rollout: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _one_fine_tune(self) -> PretrainConfig:
        if self.haze > 0 and self.self_rollout > 0:
            raise ValueError("haze and self_rollout cannot be combined: run them as separate fine-tunes")
        return self


@torch.no_grad()
def self_rollout_latents(
    sampler: Sampler, codec, prompts: list, text: torch.Tensor, seeds: list[int], g: torch.Generator
) -> torch.Tensor:
    """Latents [B, F, C, h, w]: chunk 0 sampled by the model (4-step sampler), then the prompted motion
    rendered from where that chunk left the shape (its foreground centroid; radius from its area, clamped
    to the world's range; speed U(0.9, 1.6) px/frame capped so the shape stays inside the frame)."""
    cfg = sampler.config
    c, nf = sampler.chunk_frames, cfg.latent.frames
    size = cfg.latent.height * codec.spatial
    first = sampler.denoise_chunk(sampler.new_cache(len(prompts), 1), 0, sampler.noise_bank(seeds), text).x0
    pix = codec.decode(first)
    cov = shape_rewards.foreground(pix, prompts)
    centre, mass = shape_rewards.centroids(cov)
    x, y = centre[:, -1, 0], centre[:, -1, 1]
    per_r2 = torch.tensor([AREA_PER_R2[p.shape] for p in prompts])
    radius = (mass[:, -1] / per_r2).sqrt().clamp(*RADIUS_RANGE)
    margin = path_margin(radius)
    d = torch.tensor([DIRECTIONS[p.direction] for p in prompts])
    room = torch.where(d[:, 0] > 0, size - margin - x, torch.where(d[:, 0] < 0, x - margin, 0.0))
    room = room + torch.where(d[:, 1] > 0, size - margin - y, torch.where(d[:, 1] < 0, y - margin, 0.0))
    speed = torch.minimum(0.9 + 0.7 * torch.rand(len(prompts), generator=g), room.clamp(min=0) / (nf - c))
    still = torch.full((len(prompts),), c - 1)
    motion = Motion(x, y, d[:, 0] * speed, d[:, 1] * speed, radius, still)
    z = codec.encode(render(prompts, motion, size, nf))
    z[:, :c] = first
    return z


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``final_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def pretrain(cfg: PretrainConfig, out_dir: str | Path, command: str = "", progress: bool = True) -> dict:
    """Train from scratch; writes shapes.safetensors (EMA weights), pretrain.yaml (recipe + results),
    curve.jsonl and curve.png into `out_dir`. Returns the final quality report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    mcfg = ModelConfig.load(cfg.model)
    torch.manual_seed(cfg.seed)
    model = CausalWanModel(mcfg.arch).train()
    if cfg.init is not None:
        load_state_dict_strict(model, read_state_dict(cfg.init), cfg.init, mcfg.name)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    codec = codec_for(mcfg)
    size, nf = mcfg.latent.height * codec.spatial, mcfg.latent.frames
    c = mcfg.sampler.chunk_frames
    sched = Schedule.from_config(mcfg.sampler)
    sigmas = torch.tensor(sched.sigmas)
    train_prompts = held_in_prompts()
    table = minilm(mcfg.arch.text_len).encode([p.text for p in train_prompts])  # [N, text_len, 384]
    mask = teacher_forcing_mask(nf, mcfg.tokens_per_frame, c)
    positions = torch.cat([torch.arange(nf), torch.arange(nf)])
    own = Sampler(model, mcfg)  # samples the model's own first chunks for self-rollout rows
    eval_prompts = train_prompts[:: max(1, len(train_prompts) // cfg.eval_videos)][: cfg.eval_videos]
    eval_seeds = [10_000 + i for i in range(len(eval_prompts))]

    curve = out / "curve.jsonl"
    curve.write_text("")
    t_start, losses = time.time(), []
    bar = tqdm(range(cfg.steps), desc="pretrain shapes", disable=not progress)
    for step in bar:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 1, step))
        idx = torch.randint(len(train_prompts), (cfg.batch_size,), generator=g)
        late = torch.rand(cfg.batch_size, generator=g) < cfg.late_onset
        onset = torch.where(late, c * torch.randint(1, nf // c, (cfg.batch_size,), generator=g), 0)
        videos, _ = sample_videos([train_prompts[i] for i in idx.tolist()], size, nf, g, onset)
        z = codec.encode(videos)
        keep = torch.ones(cfg.batch_size, nf)  # frames that carry a target
        n_sr = round(cfg.self_rollout * cfg.batch_size)
        if n_sr:
            seeds = torch.randint(2**62, (n_sr,), generator=g).tolist()
            sub = [train_prompts[i] for i in idx[:n_sr].tolist()]
            z[:n_sr] = self_rollout_latents(own, codec, sub, table[idx[:n_sr]], seeds, g)
            keep[:n_sr, :c] = 0  # the model's own first chunk is context only
        level = torch.randint(len(sigmas), (cfg.batch_size, nf // c), generator=g).repeat_interleave(c, 1)
        s = sigmas[level]  # [B, F] one sampler sigma per chunk
        eps = torch.randn(z.shape, generator=g)
        if cfg.haze > 0:
            from_noise = level[:, ::c] == 0  # [B, L] chunks that start from pure noise (sigma 1)
            score = torch.where(from_noise, noise_score(eps, c), torch.randn(from_noise.shape, generator=g))
            z = codec.encode(apply_haze(videos, haze_levels(score, cfg.haze)))
        noisy = (1 - s[..., None, None, None]) * z + s[..., None, None, None] * eps
        t = torch.cat([torch.zeros_like(s), s * sched.num_train_timesteps], dim=1)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        pred = model(torch.cat([z, noisy], 1), t, table[idx], positions=positions, mask=mask)[:, nf:]
        err = (pred - z).pow(2)
        loss = (err.mean((2, 3, 4)) * keep).sum() / keep.sum() if n_sr else err.mean()  # plain mean: bitwise recipe
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # EMA warm-up: early weights fade fast
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        row = {"step": step + 1, "loss": losses[-1], "grad_norm": gnorm.item(), "lr": lr_at(cfg, step)}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            q = sample_quality(ShapesWorld(mcfg, ema), eval_prompts, eval_seeds)["model"]
            row.update({"colour_rate": q["colour_ok"], "direction_rate": q["direction_ok"]})
            row["elapsed_s"] = time.time() - t_start
            bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
        with open(curve, "a") as f:
            f.write(json.dumps(row) + "\n")
    wall = time.time() - t_start

    save_safetensors(ema.state_dict(), out / "shapes.safetensors")
    world = ShapesWorld(mcfg, ema)
    held_in = sample_quality(world, eval_prompts, eval_seeds)
    held_out = sample_quality(world, held_out_prompts(), [20_000 + i for i in range(36)])
    report = {
        "command": command,
        "pretrain_config": cfg.model_dump(),
        "model_config": mcfg.model_dump(mode="json"),
        "torch": str(torch.__version__),
        "wall_time_s": round(wall, 1),
        "init_sha256": _sha256(cfg.init) if cfg.init is not None else None,
        "weights_sha256": _sha256(out / "shapes.safetensors"),
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "held_in": held_in,
        "held_out": held_out,
    }
    (out / "pretrain.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    plot_curve(out / "curve.jsonl", out / "curve.png")
    return report


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plot_curve(curve_jsonl: str | Path, png: str | Path) -> None:
    """Loss (smoothed) and the sample colour/direction rates against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(curve_jsonl).read_text().splitlines()]
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    k = 25
    smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
    a.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("x0 MSE")
    a.legend()
    ev = [r for r in rows if "colour_rate" in r]
    b.plot([r["step"] for r in ev], [r["colour_rate"] for r in ev], "o-", label="prompted colour")
    b.plot([r["step"] for r in ev], [r["direction_rate"] for r in ev], "s-", label="prompted direction")
    b.set_ylim(0, 1.02)
    b.set_xlabel("step")
    b.set_ylabel("rate (EMA samples, held-in)")
    b.legend()
    fig.suptitle("shapes generator pre-training")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
