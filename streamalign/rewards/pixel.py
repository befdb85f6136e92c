"""Generic pixel rewards that score any video: sharpness (visual-quality-like) and temporal smoothness
(motion-quality-like, on grayscale). Videos ``[B, F, C, H, W]`` in [0, 1]; scores per frame ``[B, F]``
or per frame pair ``[B, F-1]`` in [0, 1]."""

from __future__ import annotations

import torch

from .registry import RewardSpec, register

SMOOTHNESS_SCALE = 0.05  # contrast-normalised sorted-frame difference at which smoothness is 1/e


def topk_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest values over the flattened last two dims: [..., H, W] -> [...]."""
    flat = x.flatten(-2)
    return flat.topk(min(k, flat.shape[-1]), dim=-1).values.mean(-1)


def sharpness(videos: torch.Tensor, prompts: list | None = None) -> torch.Tensor:
    """Edge crispness: mean of the 2% largest RGB gradient magnitudes over the frame's contrast (largest
    distance from the median colour), clipped to [0, 1]. A crisp edge steps the full contrast within one
    pixel; a Gaussian blur of 1 px roughly halves the score. [B, F]."""
    gx = videos[..., :, 1:] - videos[..., :, :-1]
    gy = videos[..., 1:, :] - videos[..., :-1, :]
    mag = (gx[..., :-1, :].pow(2) + gy[..., :, :-1].pow(2)).sum(2).sqrt()  # [B, F, H-1, W-1]
    k = max(8, mag[0, 0].numel() // 50)
    med = videos.flatten(-2).median(-1).values  # [B, F, 3]
    contrast = (videos - med[..., None, None]).pow(2).sum(2).sqrt().flatten(-2).max(-1).values
    return (topk_mean(mag, k) / (contrast + 0.05)).clamp(0.0, 1.0)


def smoothness(videos: torch.Tensor, prompts: list | None = None) -> torch.Tensor:
    """Temporal smoothness per frame pair (use on grayscale): exp(-d / SMOOTHNESS_SCALE) with d the mean
    absolute difference of the two frames' sorted pixel values over their contrast (largest distance from
    the median, + 0.05). Sorting makes it blind to motion of a shape that stays in the frame, so it
    measures flicker: brightness changes, shapes fading, growing or popping in and out. [B, F-1]."""
    flat = videos.flatten(2)  # [B, F, C*H*W]
    ranked = flat.sort(-1).values
    diff = (ranked[:, 1:] - ranked[:, :-1]).abs().mean(-1)
    med = flat.median(-1).values
    contrast = (flat - med[..., None]).abs().max(-1).values
    pair_contrast = torch.maximum(contrast[:, 1:], contrast[:, :-1])
    return torch.exp(-diff / (pair_contrast + 0.05) / SMOOTHNESS_SCALE)


for _spec in (
    RewardSpec("sharpness", sharpness, "edge crispness over contrast (visual-quality-like)"),
    RewardSpec(
        "smoothness", smoothness, "no flicker between frames (motion-quality-like)", colour=False, grayscale=True
    ),
):
    register(_spec, overwrite=True)
