"""Pixel rewards and out-of-domain metrics of the shapes world, per frame (or frame pair).

Every function takes videos ``[B, F, 3, H, W]`` in [0, 1] and parsed prompts and returns per-frame
scores ``[B, F]`` (or ``[B, F-1]`` for frame pairs) in [0, 1]; the registry aggregates them over frames.
Colours are compared in RGB by soft nearest-palette assignment, so a dimmed or blurred red is still
red, and the background is the one the prompt names.
"""

from __future__ import annotations

import torch

from ...rewards.pixel import topk_mean
from ...rewards.registry import RewardSpec, register
from .world import AREA_PER_R2, BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, ShapePrompt, coverage, parse_prompt

GRAMMAR = "a {colour} {shape} moving {direction} on a {background} background"

COLOUR_TABLE = torch.tensor(list(COLOURS.values()))  # [K, 3]
PALETTE_TEMPERATURE = 0.12  # RGB residual scale of the soft colour assignment
PRESENCE_PIXELS = 16  # the colour must cover this many pixels in a frame to count as present
MIN_SPEED = 0.5  # px/frame: slower centroid motion earns proportionally less direction reward
BACKGROUND_FRACTION = 0.8  # share of pixels that must be background (the shape covers <= 13%)


def _rgb(names: list[str], table: dict[str, tuple[float, float, float]], device: torch.device) -> torch.Tensor:
    return torch.tensor([table[n] for n in names], device=device).view(-1, 1, 3, 1, 1)


def unmix(videos: torch.Tensor, prompts: list[ShapePrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """Explain every pixel as ``(1 - a) bg + a c_k`` over the palette colours c_k and the prompted
    background bg. Returns (soft colour assignment [B, F, K, H, W] from the unmixing residuals, coverage
    a [B, F, H, W] in [0, 1]); anti-aliased or blurred edge pixels keep their colour, at partial coverage."""
    bg = _rgb([p.background for p in prompts], BACKGROUNDS, videos.device).view(-1, 3)  # [B, 3]
    dc = COLOUR_TABLE.to(videos.device)[None] - bg[:, None]  # [B, K, 3] colour - background
    dp = videos - bg.view(-1, 1, 3, 1, 1)  # [B, F, 3, H, W] pixel - background
    dot = torch.einsum("bfchw,bkc->bfkhw", dp, dc)
    dc2 = dc.pow(2).sum(-1).view(-1, 1, dc.shape[1], 1, 1)
    alpha = (dot / dc2).clamp(0.0, 1.0)  # [B, F, K, H, W]
    resid = (dp.pow(2).sum(2, keepdim=True) - 2 * alpha * dot + alpha.pow(2) * dc2).clamp(min=0.0)
    probs = torch.softmax(-resid / (2 * PALETTE_TEMPERATURE**2), dim=2)
    return probs, (probs * alpha).sum(2)


def foreground(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Foreground coverage [B, F, H, W] in [0, 1] (see :func:`unmix`)."""
    return unmix(videos, prompts)[1]


def centroids(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid per frame [B, F, 2] (x, y in pixels) and mass [B, F] of foreground coverage w [B, F, H, W]."""
    h, wd = w.shape[-2:]
    ys = torch.arange(h, device=w.device, dtype=w.dtype) + 0.5
    xs = torch.arange(wd, device=w.device, dtype=w.dtype) + 0.5
    mass = w.sum((-2, -1))
    safe = mass.clamp(min=1e-6)
    cx = (w.sum(-2) * xs).sum(-1) / safe
    cy = (w.sum(-1) * ys).sum(-1) / safe
    return torch.stack([cx, cy], -1), mass


# ---------------------------------------------------------------------------------------------------
# in-domain rewards
# ---------------------------------------------------------------------------------------------------
def colour_match(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Presence x purity of the prompted colour. Presence: mean of the PRESENCE_PIXELS largest
    P(colour) * min(1, 2 coverage) (a dimmed shape still counts); purity: the prompted colour's share of
    the foreground coverage. [B, F]."""
    idx = torch.tensor([list(COLOURS).index(p.colour) for p in prompts], device=videos.device)
    probs, cov = unmix(videos, prompts)
    target = probs[torch.arange(len(prompts)), :, idx]  # [B, F, H, W]
    presence = topk_mean(target * (2 * cov).clamp(max=1.0), PRESENCE_PIXELS)
    purity = (cov * target).sum((-2, -1)) / cov.sum((-2, -1)).clamp(min=1e-6)
    return presence * purity


def direction_match(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Per frame pair: (1 + cos(angle between the centroid step and the prompted direction)) / 2, times
    min(1, speed / MIN_SPEED); 0 when a frame has no foreground. [B, F-1]."""
    c, mass = centroids(foreground(videos, prompts))
    step = c[:, 1:] - c[:, :-1]
    d = torch.tensor([DIRECTIONS[p.direction] for p in prompts], device=videos.device).view(-1, 1, 2)
    speed = step.norm(dim=-1)
    cos = (step * d).sum(-1) / speed.clamp(min=1e-6)
    present = ((mass[:, 1:] > 1.0) & (mass[:, :-1] > 1.0)).to(videos.dtype)
    return (1 + cos) / 2 * (speed / MIN_SPEED).clamp(max=1.0) * present


# ---------------------------------------------------------------------------------------------------
# out-of-domain metrics (not optimised by default)
# ---------------------------------------------------------------------------------------------------
def background_cleanliness(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """How close the BACKGROUND_FRACTION most background-like pixels are to the prompted background:
    mean of exp(-|p - bg|^2 / (2 * 0.1^2)) over them. Filling or noising the frame lowers it. [B, F]."""
    bg = _rgb([p.background for p in prompts], BACKGROUNDS, videos.device)
    sim = torch.exp(-(videos - bg).pow(2).sum(2) / (2 * 0.1**2))
    k = int(BACKGROUND_FRACTION * sim[0, 0].numel())
    return topk_mean(sim, k)


def shape_fidelity(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Soft IoU between the foreground and the prompted shape rendered at the foreground's centroid with
    the foreground's area. [B, F]."""
    shape = torch.tensor([SHAPES.index(p.shape) for p in prompts], device=videos.device)
    fg = foreground(videos, prompts)
    c, mass = centroids(fg)
    area_per_r2 = torch.tensor([AREA_PER_R2[p.shape] for p in prompts], device=videos.device)
    b, f = mass.shape
    radius = (mass / area_per_r2[:, None]).clamp(min=1e-3).sqrt()  # [B, F]
    tpl = coverage(
        shape.repeat_interleave(f), c[..., 0].reshape(-1, 1), c[..., 1].reshape(-1, 1), radius.reshape(-1), fg.shape[-1]
    ).view(b, f, *fg.shape[-2:])
    inter = torch.minimum(fg, tpl).sum((-2, -1))
    union = torch.maximum(fg, tpl).sum((-2, -1)).clamp(min=1e-6)
    return inter / union


# ---------------------------------------------------------------------------------------------------
# hard classifications (pre-training diagnostics, the rates the shipped model is held to)
# ---------------------------------------------------------------------------------------------------
def dominant_colour(videos: torch.Tensor, prompts: list[ShapePrompt]) -> list[str]:
    """The palette colour holding the most foreground coverage over the whole video, per video."""
    probs, cov = unmix(videos, prompts)
    score = (probs * cov.unsqueeze(2)).sum((1, 3, 4))  # [B, K]
    return [list(COLOURS)[i] for i in score.argmax(1).tolist()]


def dominant_direction(videos: torch.Tensor, prompts: list[ShapePrompt], min_travel: float = 3.0) -> list[str | None]:
    """The cardinal direction of the centroid's net travel (last frame - first frame), or None if it
    travels less than `min_travel` pixels."""
    c, _ = centroids(foreground(videos, prompts))
    travel = c[:, -1] - c[:, 0]
    dirs = torch.tensor(list(DIRECTIONS.values()), device=videos.device)
    best = (travel @ dirs.T).argmax(1)
    far = travel.norm(dim=-1) >= min_travel
    return [list(DIRECTIONS)[i] if ok else None for i, ok in zip(best.tolist(), far.tolist(), strict=True)]


# ---------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------
#: The shapes world's default composite (in-domain) and its out-of-domain metrics.
SHAPES_REWARDS = "colour_match=1,direction_match=1,sharpness=0.5,smoothness=0.5"
SHAPES_METRICS = "background_cleanliness,shape_fidelity"

_GRAMMAR = {"parse_prompt": parse_prompt, "prompt_format": GRAMMAR}
for _spec in (
    RewardSpec("colour_match", colour_match, "prompted colour present and pure (text-alignment-like)", **_GRAMMAR),
    RewardSpec(
        "direction_match", direction_match, "centroid moves the prompted way (text-alignment-like)", **_GRAMMAR
    ),
    RewardSpec(
        "background_cleanliness", background_cleanliness, "background stays the prompted colour", ood=True, **_GRAMMAR
    ),
    RewardSpec(
        "shape_fidelity", shape_fidelity, "foreground has the prompted shape (soft IoU)", ood=True, **_GRAMMAR
    ),
):
    register(_spec, overwrite=True)
