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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from pydantic import Field, model_validator

from ...io.files import append_line
from ...io.outputs import output_folder
from ...io.plots import save, subplots
from ...io.progress import progress_bar
from ...models.checkpoint import load_state_dict_strict, read_state_dict, save_safetensors
from ...models.noise import derive_seed
from ...models.sampler import Sampler, Schedule
from ...models.wan import CausalWanModel, teacher_forcing_mask
from ...optim import lr_at
from ...pipeline import Pipeline, build_codec, minilm
from ...schemas.config import ModelConfig
from ...schemas.run import RunConfig, arg
from . import rewards as shape_rewards
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


class TrainingRecipe(RunConfig):
    """The optimiser, EMA and check settings a shapes training stage (pre-training, distillation) shares."""

    model: str = arg("shapes", "Model config (a shapes-world preset or YAML).", flag="--config", short="-c")
    seed: int = arg(0, "Seed of the initialisation and of every data/noise draw.")
    steps: int = Field(1500, gt=0, description="Optimiser steps.")
    batch_size: int = Field(32, gt=0, description="Videos per step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    warmup: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay to this share of --lr.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip.")
    ema: float = Field(0.999, ge=0, lt=1, description="EMA decay of the saved weights.")
    eval_every: int = Field(250, gt=0, description="Steps between sample-quality checks.")
    eval_videos: int = Field(32, gt=0, description="Videos per sample-quality check.")
    threads: int = Field(2, gt=0, description="torch CPU threads (results are reproducible per count).")


class PretrainConfig(TrainingRecipe):
    """Pre-train the shapes generator (x0-prediction, clean causal context, sampler sigmas). The shipped
    weights came from this command (see the recipes next to them)."""

    # share of training videos whose shape stays still until a later chunk boundary, then moves: it
    # teaches the model to start moving as prompted when its own first chunk came out static
    late_onset: float = Field(0.3, ge=0, le=1, description="Share of videos whose motion starts at chunk 1 or 2.")
    # exposure flicker (see world.haze_levels): chunks trained from pure noise are over-exposed by
    # haze * max(0, 2 Phi(z) - 1) with z the standardised sum of exactly that noise, other chunks by an
    # independent z. The model learns to read its initial noise, as a distilled generator does, so
    # branches of a fork group differ (and the rewards, which all dislike the flicker, tell them apart)
    haze: float = Field(0.0, ge=0, lt=1, description="Exposure flicker read from each chunk's initial noise "
                        "(0 = none; stage 2: 0.5).")  # fmt: skip
    # self-rollout fine-tuning: start from these weights, and build this share of every batch from the
    # model's own first chunk followed by the prompted motion rendered onward from where it left the shape
    init: str | None = arg(None, "Start from these weights (fine-tuning).")
    self_rollout: float = Field(0.0, ge=0, le=1, description="Share of each batch whose first chunk the model "
                                "samples itself.")  # fmt: skip

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


def pretrain(cfg: PretrainConfig, out_dir: str | Path, command: str | None = None, progress: bool = True) -> dict:
    """Train from scratch; writes shapes.safetensors (EMA weights), pretrain.yaml (recipe + results),
    curve.jsonl and curve.png into `out_dir`, staged: the folder appears (or replaces an earlier one) whole
    at the end, while the run is under way its files are in the hidden ``.NAME.tmp-PID`` beside it.
    Returns the final quality report."""
    if cfg.init is not None and not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init {cfg.init} does not exist: give the weights of a first pre-training run")
    command = command if command is not None else "streamalign " + " ".join(sys.argv[1:])
    with output_folder(out_dir, "shapes pretrain") as out:
        return _pretrain(cfg, out, command, progress)


def _pretrain(cfg: PretrainConfig, out: Path, command: str, progress: bool) -> dict:
    torch.set_num_threads(cfg.threads)
    mcfg = ModelConfig.load(cfg.model)
    torch.manual_seed(cfg.seed)
    model = CausalWanModel(mcfg.arch).train()
    if cfg.init is not None:
        load_state_dict_strict(model, read_state_dict(cfg.init), cfg.init, mcfg.name)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    codec = build_codec(mcfg)
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
    bar = progress_bar(range(cfg.steps), desc="pretrain shapes", show=progress)
    st = Step(model, ema, opt, cfg, mcfg, curve, bar, losses, t_start, eval_prompts, eval_seeds)
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
            group["lr"] = lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
        pred = model(torch.cat([z, noisy], 1), t, table[idx], positions=positions, mask=mask)[:, nf:]
        err = (pred - z).pow(2)
        loss = (err.mean((2, 3, 4)) * keep).sum() / keep.sum() if n_sr else err.mean()  # plain mean: bitwise recipe
        optimise(st, loss, step, lr)
    wall = time.time() - t_start

    save_safetensors(ema.state_dict(), out / "shapes.safetensors")
    world = Pipeline.of_model(mcfg, ema)
    held_in = sample_quality(world, eval_prompts, eval_seeds)
    held_out = sample_quality(world, held_out_prompts(), [20_000 + i for i in range(36)])
    report = {
        "command": command,
        "pretrain_config": cfg.model_dump(),
        "model_config": mcfg.model_dump(mode="json"),
        "torch": str(torch.__version__),
        "wall_time_s": round(wall, 1),
        "init_sha256": sha256_of(cfg.init) if cfg.init is not None else None,
        "weights_sha256": sha256_of(out / "shapes.safetensors"),
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "held_in": held_in,
        "held_out": held_out,
    }
    (out / "pretrain.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    plot_curve(out / "curve.jsonl", out / "curve.png")
    return report


@dataclass
class Step:
    """What one optimiser step of a shapes training loop (pre-training, distillation) works on."""

    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    cfg: TrainingRecipe
    mcfg: ModelConfig
    curve: Path
    bar: object
    losses: list[float]
    t_start: float
    eval_prompts: list
    eval_seeds: list[int]


def optimise(st: Step, loss: torch.Tensor, step: int, lr: float) -> None:
    """Backward `loss`, clip the gradient norm, step, update the EMA (with warm-up), append the curve row
    (with the EMA model's colour / direction rates on the eval prompts every ``eval_every`` steps)."""
    cfg = st.cfg
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(st.model.parameters(), cfg.grad_clip)
    st.opt.step()
    decay = min(cfg.ema, (1 + step) / (10 + step))  # EMA warm-up: early weights fade fast
    with torch.no_grad():
        for pe, pm in zip(st.ema.parameters(), st.model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)
    st.losses.append(loss.item())
    st.bar.set_postfix(loss=f"{st.losses[-1]:.4f}")
    row = {"step": step + 1, "loss": st.losses[-1], "grad_norm": gnorm.item(), "lr": lr}
    if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
        q = sample_quality(Pipeline.of_model(st.mcfg, st.ema), st.eval_prompts, st.eval_seeds)["model"]
        row.update({"colour_rate": q["colour_ok"], "direction_rate": q["direction_ok"]})
        row["elapsed_s"] = time.time() - st.t_start
        st.bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    append_line(st.curve, json.dumps(row))


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plot_curve(curve_jsonl: str | Path, png: str | Path, title: str = "shapes generator pre-training") -> None:
    """Loss (smoothed) and the sample colour/direction rates against the step."""
    rows = [json.loads(line) for line in Path(curve_jsonl).read_text().splitlines()]
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    k = 25
    smooth = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
    fig, (a, b) = subplots(1, 2, figsize=(9, 3.2))
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
    fig.suptitle(title)
    save(fig, png, dpi=110)


def summary_line(report: dict, out: str | Path, weights: str = "shapes.safetensors") -> str:
    """What `shapes pretrain` (and `shapes distill`) prints: where the weights went and the final rates."""
    m, o = report["held_in"]["model"], report["held_out"]["model"]
    return (f"wrote {out}/{weights} in {report['wall_time_s'] / 60:.1f} min: held-in colour "
            f"{m['colour_ok']:.0%} direction {m['direction_ok']:.0%}; held-out colour {o['colour_ok']:.0%} "
            f"direction {o['direction_ok']:.0%}")


def pretrain_stage(cfg: PretrainConfig, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    return summary_line(pretrain(cfg, out), out)
