"""How good a shapes generator is: prompted-colour and prompted-direction rates, and the pixel rewards of
its samples next to those of rendered ground truth for the same prompts (blur, flicker, hacks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...rewards import SHAPES_METRICS, SHAPES_REWARDS, CompositeReward
from ...rewards import shapes as R
from .pipeline import ShapesWorld
from .world import ShapePrompt, estimate_haze, remove_haze, sample_videos


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
    world: ShapesWorld, prompts: Sequence[ShapePrompt], seeds: Sequence[int], batch: int = 64
) -> dict[str, dict[str, float]]:
    """Means of :func:`video_metrics` over samples of `world` ('model') and over rendered ground truth of
    the same prompts ('ground_truth', motion drawn from the seeds)."""
    sums: dict[str, dict[str, float]] = {"model": {}, "ground_truth": {}}
    for i in range(0, len(prompts), batch):
        ps, ss = list(prompts[i : i + batch]), list(seeds[i : i + batch])
        vids = {
            "model": world.generate([p.text for p in ps], ss),
            "ground_truth": sample_videos(ps, world.video_size, world.config.latent.frames, _gen(ss[0]))[0],
        }
        for who, v in vids.items():
            for k, x in video_metrics(v, ps).items():
                sums[who][k] = sums[who].get(k, 0.0) + x.sum().item()
    return {who: {k: v / len(prompts) for k, v in d.items()} for who, d in sums.items()}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
