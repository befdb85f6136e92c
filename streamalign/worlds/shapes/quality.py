"""How good a shapes generator is: prompted-colour and prompted-direction rates, and the pixel rewards of
its samples next to those of rendered ground truth for the same prompts (blur, flicker, hacks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from ...models.placement import CPU_FP32, Placement
from ...pipeline import Pipeline
from ...rewards import CompositeReward
from ...schemas.run import RunConfig, arg
from ...schemas.sections import Hardware
from . import rewards as R
from .rewards import SHAPES_METRICS, SHAPES_REWARDS
from .world import (
    SHIPPED_WEIGHTS,
    ShapePrompt,
    all_prompts,
    estimate_haze,
    held_in_prompts,
    held_out_prompts,
    remove_haze,
    sample_videos,
)


def video_metrics(videos: torch.Tensor, prompts: list[ShapePrompt]) -> dict[str, torch.Tensor]:
    """Per-video values [B]: colour_ok / direction_ok (0/1, the rates; read after exposure correction, so
    they measure content, not flicker), haze (mean over-exposure level, 0 for ground truth) and every
    registered shapes reward and OOD metric with its default options (smoothness on grayscale)."""
    clean = remove_haze(videos, prompts)
    out = {
        "colour_ok": torch.tensor(
            [c == p.colour for c, p in zip(R.dominant_colour(clean, prompts), prompts, strict=True)]
        ),
        "direction_ok": torch.tensor(
            [d == p.direction for d, p in zip(R.dominant_direction(clean, prompts), prompts, strict=True)]
        ),
        "haze": estimate_haze(videos, prompts).mean(1),
    }
    scores = CompositeReward.parse(SHAPES_REWARDS, SHAPES_METRICS)(videos, [p.text for p in prompts])
    out.update(scores)
    return {k: v.float() for k, v in out.items()}


@torch.no_grad()
def sample_quality(
    world: Pipeline, prompts: Sequence[ShapePrompt], seeds: Sequence[int], batch: int = 64
) -> dict[str, dict[str, float]]:
    """Means of :func:`video_metrics` over samples of `world` ('model') and over rendered ground truth of
    the same prompts ('ground_truth', motion drawn from the seeds)."""
    sums: dict[str, dict[str, float]] = {"model": {}, "ground_truth": {}}
    size = world.config.latent.height * world.codec.spatial
    for i in range(0, len(prompts), batch):
        ps, ss = list(prompts[i : i + batch]), list(seeds[i : i + batch])
        vids = {
            "model": world.generate([p.text for p in ps], ss),
            "ground_truth": sample_videos(ps, size, world.config.latent.frames, _gen(ss[0]))[0],
        }
        for who, v in vids.items():
            for k, x in video_metrics(v, ps).items():
                sums[who][k] = sums[who].get(k, 0.0) + x.sum().item()
    return {who: {k: v / len(prompts) for k, v in d.items()} for who, d in sums.items()}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_report(
    weights: str | Path | None = None, videos: int = 96, seed: int = 0, placement: Placement = CPU_FP32
) -> str:
    """`streamalign shapes check`: rates and rewards of a shapes generator (default: the shipped one) next to
    rendered ground truth, on `videos` held-in and held-out samples (sample i uses seed + i)."""
    world = Pipeline.from_weights("shapes", weights or SHIPPED_WEIGHTS, placement)
    lines = []
    for name, prompts in (("held-in", held_in_prompts()), ("held-out", held_out_prompts())):
        chosen = [prompts[(i * 7) % len(prompts)] for i in range(videos)]
        q = sample_quality(world, chosen, [seed + i for i in range(videos)])
        lines.append(f"{name} ({videos} samples)      model   ground truth")
        lines += [f"  {k:24s} {q['model'][k]:6.3f}   {q['ground_truth'][k]:6.3f}" for k in q["model"]]
    return "\n".join(lines)


class CheckRun(RunConfig):
    """Sample quality of a shapes generator: colour/direction rates and every reward, next to ground truth."""

    weights: str | None = arg(None, "Generator weights (default: the shipped ones).")
    videos: int = Field(96, ge=1, description="Samples per prompt set (held-in and held-out).")
    seed: int = arg(0, "First seed; sample i uses seed + i.")
    hardware: Hardware = Hardware()


class PromptsRun(RunConfig):
    """Print the world's grammar prompts, one per line (all 288 by default)."""

    held_in: bool = arg(False, "Only the 252 pre-training prompts.")
    held_out: bool = arg(False, "Only the 36 held-out prompts.")


def check_stage(cfg: CheckRun) -> str:
    return check_report(cfg.weights, cfg.videos, cfg.seed, Placement.of(cfg.hardware))


def prompts_stage(cfg: PromptsRun) -> str:
    chosen = held_out_prompts() if cfg.held_out else held_in_prompts() if cfg.held_in else all_prompts()
    return "\n".join(p.text for p in chosen)
