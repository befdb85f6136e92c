"""Self-distillation of the shapes generator (stage 3 of the shipped recipe, preset ``shapes-distilled``).

The pre-trained generator regresses x0, so at sigma 1 it predicts a blurred mean and the solver noise of
later steps picks the details: its videos depend on the solver noise about as much as on the initial noise
(``experiment noise-sources``). A Self-Forcing (DMD) generator instead maps its initial noise to one sample
and every later step maps the re-noised input back to that sample. This stage distils the teacher (the
shipped weights) into such a student:

- targets: the teacher's deterministic DDIM path (``Sampler.denoise_chunk(ode=True)``: re-noising with the
  noise each input implies), a smooth function X(eps0) of the initial noise of every chunk (the chunks
  before it included, through the causal context). A stochastic teacher would make the target depend on
  solver noise, and its regression on eps0 would be the blurred mean again;
- student (initialised from the teacher), per chunk at one of the sampler's steps i in a teacher-forcing
  pass over ``[X at t=0; noisy]``: step 0 reads the very initial noise eps0, step i >= 1 reads
  ``(1 - sigma_i) X + sigma_i eps'`` with FRESH noise eps' (what the sampler's re-noising feeds it), and
  every step's target is X. So from step 1 on the student maps the re-noised input back to the trajectory's
  final x0, whatever the solver noise was (consistency to the endpoint, as in consistency distillation, on
  the sampler's own input distribution).

The teacher's targets are generated once per ``--pool`` videos (held-in prompts, seeds from ``--seed``)
and each step draws a batch from that pool. Everything random derives from ``seed`` and the step index.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import yaml
from pydantic import Field

from ...io.outputs import output_folder
from ...io.progress import progress_bar
from ...models.checkpoint import load_state_dict_strict, read_state_dict, save_safetensors
from ...models.noise import derive_seed
from ...models.sampler import Sampler, Schedule
from ...models.wan import CausalWanModel, teacher_forcing_mask
from ...optim import lr_at
from ...pipeline import Pipeline, minilm
from ...schemas.config import ModelConfig
from ...schemas.run import arg
from .pretrain import Step, TrainingRecipe, optimise, plot_curve, sha256_of, summary_line
from .quality import sample_quality
from .world import SHIPPED_WEIGHTS, held_in_prompts, held_out_prompts

# the distilled generator's file name, in a run folder and among the shipped assets
DISTILLED_NAME = "shapes-distilled.safetensors"


class DistillConfig(TrainingRecipe):
    """Distil the shapes generator into a near-deterministic one (its final video a function of the initial
    noise, as a Self-Forcing generator's is). The shipped ``shapes-distilled`` weights came from this command."""

    init: str | None = arg(None, "Teacher weights, also the student's start (default: the shipped shapes weights).")
    pool: int = Field(512, gt=0, description="Teacher videos (DDIM path) the batches are drawn from.")
    steps: int = Field(300, gt=0, description="Optimiser steps.")
    batch_size: int = Field(16, gt=0, description="Videos per step.")
    lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate.")
    warmup: int = Field(20, ge=0, description="Linear learning-rate warm-up steps.")
    ema: float = Field(0.99, ge=0, lt=1, description="EMA decay of the saved weights.")
    eval_every: int = Field(150, gt=0, description="Steps between sample-quality checks.")
    eval_videos: int = Field(16, gt=0, description="Videos per sample-quality check.")
    # steps >= 1 trained on a re-noising of the student's own step-0 prediction (Self-Forcing: the inputs the
    # sampler will feed it) learn to ignore the solver noise wherever that prediction is less sharp than X
    own_share: float = Field(0.5, ge=0, le=1, description="Share of chunks whose later-step inputs re-noise "
                             "the student's own step-0 prediction instead of the endpoint.")  # fmt: skip


@torch.no_grad()
def teacher_pool(
    sampler: Sampler, table: torch.Tensor, seeds: list[int], batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's DDIM videos for (text row, seed) pairs: initial noise [N, F, C, h, w] (the sampler's
    NoiseBank of each seed) and final latents [N, F, C, h, w]. `table` [N, L, D]: each video's text."""
    n = sampler.config.num_chunks
    eps, out = [], []
    for lo in range(0, len(seeds), batch):
        bank = sampler.noise_bank(seeds[lo : lo + batch])
        cache = sampler.new_cache(len(bank.seeds), n)
        text = table[lo : lo + batch]
        out.append(torch.cat([sampler.denoise_chunk(cache, j, bank, text, ode=True).x0 for j in range(n)], 1))
        eps.append(torch.cat([bank.initial(j) for j in range(n)], 1))
    return torch.cat(eps), torch.cat(out)


def distill(cfg: DistillConfig, out_dir: str | Path, command: str | None = None, progress: bool = True) -> dict:
    """Distil; writes shapes-distilled.safetensors (EMA weights), distill.yaml (recipe, teacher and weight
    hashes, results), curve.jsonl and curve.png into `out_dir` (staged like :func:`pretrain`). Returns the
    recipe report."""
    teacher = Path(cfg.init) if cfg.init is not None else SHIPPED_WEIGHTS
    if not teacher.is_file():
        raise FileNotFoundError(f"--init {teacher} does not exist: give the teacher's weights (a pretrain run's)")
    command = command if command is not None else "streamalign " + " ".join(sys.argv[1:])
    with output_folder(out_dir, "shapes distill") as out:
        return _distill(cfg, teacher, out, command, progress)


def _distill(cfg: DistillConfig, teacher_path: Path, out: Path, command: str, progress: bool) -> dict:
    torch.set_num_threads(cfg.threads)
    mcfg = ModelConfig.load(cfg.model)
    teacher = CausalWanModel(mcfg.arch).eval().requires_grad_(False)
    load_state_dict_strict(teacher, read_state_dict(teacher_path), str(teacher_path), mcfg.name)
    model = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    nf, c = mcfg.latent.frames, mcfg.sampler.chunk_frames
    sigmas = torch.tensor(Schedule.from_config(mcfg.sampler).sigmas)
    n_train = Schedule.from_config(mcfg.sampler).num_train_timesteps
    train_prompts = held_in_prompts()
    table = minilm(mcfg.arch.text_len).encode([p.text for p in train_prompts])  # [N, text_len, 384]
    mask = teacher_forcing_mask(nf, mcfg.tokens_per_frame, c)
    positions = torch.cat([torch.arange(nf), torch.arange(nf)])
    eval_prompts = train_prompts[:: max(1, len(train_prompts) // cfg.eval_videos)][: cfg.eval_videos]
    eval_seeds = [10_000 + i for i in range(len(eval_prompts))]

    t_start = time.time()
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, 2))
    pool_idx = torch.randint(len(train_prompts), (cfg.pool,), generator=g)
    pool_seeds = [derive_seed(cfg.seed, 3, i) for i in range(cfg.pool)]
    eps0, target = teacher_pool(Sampler(teacher, mcfg), table[pool_idx], pool_seeds)
    pool_s = time.time() - t_start

    curve = out / "curve.jsonl"
    curve.write_text("")
    losses: list[float] = []
    bar = progress_bar(range(cfg.steps), desc="distill shapes", show=progress)
    st = Step(model, ema, opt, cfg, mcfg, curve, bar, losses, t_start, eval_prompts, eval_seeds)
    for step in bar:
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, 4, step))
        rows = torch.randint(cfg.pool, (cfg.batch_size,), generator=g)
        x, e0 = target[rows], eps0[rows]
        level = torch.randint(len(sigmas), (cfg.batch_size, nf // c), generator=g).repeat_interleave(c, 1)
        s = sigmas[level][..., None, None, None]  # [B, F, 1, 1, 1] one sampler sigma per chunk
        fresh = torch.randn(x.shape, generator=g)
        own = torch.rand(cfg.batch_size, nf // c, generator=g).repeat_interleave(c, 1) < cfg.own_share
        text = table[pool_idx[rows]]
        t = torch.cat([torch.zeros(level.shape), sigmas[level] * n_train], dim=1)
        base = x
        if own.any():  # the student's own step-0 prediction: what the sampler re-noises at step 1
            with torch.no_grad():
                t0 = torch.cat([torch.zeros(level.shape), torch.full(level.shape, float(n_train))], dim=1)
                first = model(torch.cat([x, e0], 1), t0, text, positions=positions, mask=mask)[:, nf:]
            base = torch.where(own[..., None, None, None], first, x)
        # step 0 reads the trajectory's own initial noise; later steps a fresh re-noising of its endpoint
        # (or of the student's own first prediction of it); the target is always the endpoint
        noisy = torch.where(level[..., None, None, None] == 0, e0, (1 - s) * base + s * fresh)
        for group in opt.param_groups:
            group["lr"] = lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.final_lr_ratio)
        pred = model(torch.cat([x, noisy], 1), t, text, positions=positions, mask=mask)[:, nf:]
        loss = (pred - x).pow(2).mean()
        optimise(st, loss, step, lr)
    wall = time.time() - t_start

    save_safetensors(ema.state_dict(), out / DISTILLED_NAME)
    world = Pipeline.of_model(mcfg, ema)
    report = {
        "command": command,
        "distill_config": cfg.model_dump(),
        "model_config": mcfg.model_dump(mode="json"),
        "torch": str(torch.__version__),
        "wall_time_s": round(wall, 1),
        "teacher_pool_s": round(pool_s, 1),
        "init_sha256": sha256_of(teacher_path),
        "weights_sha256": sha256_of(out / DISTILLED_NAME),
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "held_in": sample_quality(world, eval_prompts, eval_seeds),
        "held_out": sample_quality(world, held_out_prompts(), [20_000 + i for i in range(36)]),
    }
    (out / "distill.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    plot_curve(out / "curve.jsonl", out / "curve.png", "shapes generator self-distillation")
    return report


def distill_stage(cfg: DistillConfig, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    return summary_line(distill(cfg, out), out, DISTILLED_NAME)
