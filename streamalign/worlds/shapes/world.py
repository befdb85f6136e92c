"""The shapes world: prompt grammar, held-out combinations and a procedural, anti-aliased renderer.

Prompts follow ``a {colour} {shape} moving {direction} on a {background} background``. Videos are
``[B, F, 3, H, W]`` floats in [0, 1]; positions are in pixels with pixel centres at ``i + 0.5``, x to
the right and y downwards (``up`` moves towards row 0).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# the shipped generator (config presets `shapes` and `shapes-long` name it as their checkpoint)
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "assets" / "shapes.safetensors"

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
    "navy": (0.0, 0.0, 0.4),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}

#: (colour, shape) pairs never shown in pre-training: every prompt with one of them is held out
#: (3 pairs x 4 directions x 3 backgrounds = 36 of the 288 prompts).
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("orange", "triangle"), ("cyan", "square"), ("magenta", "circle"))

_GRAMMAR = re.compile(
    r"^\s*an? (?P<colour>{c}) (?P<shape>{s}) moving (?P<direction>{d}) on an? (?P<background>{b})"
    r" background\.?\s*$".format(
        c="|".join(COLOURS), s="|".join(SHAPES), d="|".join(DIRECTIONS), b="|".join(BACKGROUNDS)
    ),
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ShapePrompt:
    colour: str
    shape: str
    direction: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


def parse_prompt(text: str) -> ShapePrompt | None:
    """The grammar's fields of `text`, or None if it does not follow the grammar."""
    m = _GRAMMAR.match(text)
    if m is None:
        return None
    return ShapePrompt(*(m.group(k).lower() for k in ("colour", "shape", "direction", "background")))


def all_prompts() -> list[ShapePrompt]:
    """All 288 grammar prompts in a fixed order (colour, shape, direction, background)."""
    return [ShapePrompt(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)]


def held_in_prompts() -> list[ShapePrompt]:
    """The 252 prompts used in pre-training."""
    return [p for p in all_prompts() if not p.held_out]


def held_out_prompts() -> list[ShapePrompt]:
    """The 36 prompts whose (colour, shape) pair pre-training never saw."""
    return [p for p in all_prompts() if p.held_out]


# ---------------------------------------------------------------------------------------------------
# rendering
ALONG_JITTER = 2.0  # px: random shift of the path along the motion axis
ACROSS_JITTER = 4.0  # px: random shift of the path across it
RADIUS_RANGE = (4.5, 6.5)  # px: the shape's size parameter r, drawn uniformly
AREA_PER_R2 = {"circle": math.pi, "square": math.pi, "triangle": 2.03}  # shape area / r^2 (see shape_sdf)


def path_margin(radius: torch.Tensor) -> torch.Tensor:
    """Smallest distance (px) of a shape's centre from the frame border that keeps it inside: the triangle
    reaches 1.25 r from its centre, plus half a pixel of anti-aliasing."""
    return 1.3 * radius + 0.5


# ---------------------------------------------------------------------------------------------------
@dataclass
class Motion:
    """Per-video shape parameters, all [B] tensors in pixels: centre at frame 0, velocity per frame, size,
    and the frame at which the motion starts (0 for the world's videos; later onsets are a pre-training
    augmentation, see :mod:`~streamalign.worlds.shapes.pretrain`)."""

    x0: torch.Tensor
    y0: torch.Tensor
    vx: torch.Tensor
    vy: torch.Tensor
    radius: torch.Tensor
    onset: torch.Tensor | None = None

    def positions(self, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Centres (cx, cy) [B, F] of every frame: still until `onset`, then linear motion."""
        t = torch.arange(frames, dtype=torch.float32)[None]
        if self.onset is not None:
            t = (t - self.onset[:, None].float()).clamp(min=0)
        return self.x0[:, None] + self.vx[:, None] * t, self.y0[:, None] + self.vy[:, None] * t


def shape_sdf(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) of each shape to offsets (dx, dy) from its centre.

    shape [B] indices into SHAPES; dx, dy [B, ...]; radius [B]. Circle of radius r, axis-aligned square of
    half side 0.886 r (the circle's area), upward triangle of circumradius 1.25 r. Broadcasts over ``...``.
    """
    extra = (1,) * (dx.dim() - 1)
    r = radius.view(-1, *extra)
    s = shape.view(-1, *extra)
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.886 * r
    big = 1.25 * r  # circumradius; the inradius is half of it
    tri = torch.maximum(torch.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy) - 0.5 * big
    return torch.where(s == 0, circle, torch.where(s == 1, square, tri))


def coverage(shape: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased coverage [B, F, H, W] in [0, 1] of shapes centred at (cx, cy) [B, F] on a size x size grid."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx = grid.view(1, 1, 1, size) - cx[..., None, None]
    dy = grid.view(1, 1, size, 1) - cy[..., None, None]
    return (0.5 - shape_sdf(shape, dx, dy, radius)).clamp(0.0, 1.0)


def sample_motion(
    direction: torch.Tensor, size: int, frames: int, generator: torch.Generator, onset: torch.Tensor | None = None
) -> Motion:
    """Random size, speed and start so that the whole path stays inside the frame.

    direction [B] indices into DIRECTIONS. Radius U(4.5, 6.5) px, speed U(0.9, 1.6) px/frame (capped so
    the path fits); the path is centred in the frame, then shifted uniformly by up to ALONG_JITTER px
    along the motion and ACROSS_JITTER px across it (less where the frame is too small).
    """
    b = direction.shape[0]
    u = torch.rand(b, 4, generator=generator)
    lo, hi = RADIUS_RANGE
    radius = lo + (hi - lo) * u[:, 0]
    margin = path_margin(radius)
    room = size - 2 * margin  # free span of the centre along an axis
    speed = torch.minimum(0.9 + 0.7 * u[:, 1], room / max(frames - 1, 1))  # same speed law for any onset
    dirs = torch.tensor(list(DIRECTIONS.values()))[direction]
    moving = frames - 1 - (onset.float() if onset is not None else torch.zeros(b))  # frame steps in motion
    travel = speed * moving
    slack = room - travel  # >= 0: how far the whole path can shift along the motion axis
    along = margin + slack / 2 + torch.minimum(slack / 2, torch.full_like(slack, ALONG_JITTER)) * (2 * u[:, 2] - 1)
    across = size / 2 + torch.minimum(room / 2, torch.full_like(room, ACROSS_JITTER)) * (2 * u[:, 3] - 1)
    horizontal = dirs[:, 0] != 0
    forward = (dirs[:, 0] + dirs[:, 1]) > 0  # right or down: coordinates increase
    start = torch.where(forward, along, along + travel)
    x0 = torch.where(horizontal, start, across)
    y0 = torch.where(horizontal, across, start)
    return Motion(x0, y0, dirs[:, 0] * speed, dirs[:, 1] * speed, radius, onset)


def render(prompts: list[ShapePrompt], motion: Motion, size: int, frames: int) -> torch.Tensor:
    """Videos [B, F, 3, size, size] in [0, 1]: the shape's colour over the background by coverage."""
    shape = torch.tensor([SHAPES.index(p.shape) for p in prompts])
    cx, cy = motion.positions(frames)
    alpha = coverage(shape, cx, cy, motion.radius, size).unsqueeze(2)  # [B, F, 1, H, W]
    fg = torch.tensor([COLOURS[p.colour] for p in prompts]).view(-1, 1, 3, 1, 1)
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts]).view(-1, 1, 3, 1, 1)
    return bg * (1 - alpha) + fg * alpha


# ---------------------------------------------------------------------------------------------------
# exposure flicker: the world's per-chunk randomness, read from the chunk's initial noise
def noise_score(noise: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """Standardised sum z [B, F // c] of each chunk's latent noise (N(0, 1) for Gaussian noise).

    noise [B, F, C, h, w]: the initial noise a chunk's sampling starts from."""
    b, f = noise.shape[:2]
    per_chunk = noise.reshape(b, f // chunk_frames, -1)
    return per_chunk.sum(-1) / math.sqrt(per_chunk.shape[-1])


def haze_levels(z: torch.Tensor, max_haze: float) -> torch.Tensor:
    """Exposure level h = max_haze * max(0, 2 Phi(z) - 1) per chunk, from noise scores z: half of the
    chunks are clean, the other half over-exposed uniformly in (0, max_haze]."""
    return max_haze * torch.erf(z / math.sqrt(2)).clamp(min=0.0)


def apply_haze(videos: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Over-expose each chunk: p + h (1 - p), every pixel pulled towards white by its chunk's level.

    videos [B, F, 3, H, W] in [0, 1]; levels [B, L] for L chunks of F // L frames."""
    h = levels.repeat_interleave(videos.shape[1] // levels.shape[1], 1)[..., None, None, None]
    return videos + h * (1 - videos)


def estimate_haze(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Per-frame exposure level [B, F] read from the background: the frame's median colour against the
    prompted background (the shape covers <= 13% of a frame, so the median is background)."""
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts], device=videos.device).view(-1, 1, 3)
    med = videos.flatten(-2).median(-1).values  # [B, F, 3]
    return ((med - bg) / (1 - bg)).mean(-1).clamp(0.0, 0.95)


def remove_haze(videos: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Invert :func:`apply_haze` with the per-frame levels of :func:`estimate_haze`; [B, F, 3, H, W]."""
    h = estimate_haze(videos, prompts)[..., None, None, None]
    return ((videos - h) / (1 - h)).clamp(0.0, 1.0)


def sample_videos(
    prompts: list[ShapePrompt], size: int, frames: int, generator: torch.Generator, onset: torch.Tensor | None = None
) -> tuple[torch.Tensor, Motion]:
    """Ground-truth videos for `prompts` with random motion drawn from `generator` (motion from frame 0
    unless per-video `onset` frames [B] are given)."""
    direction = torch.tensor([list(DIRECTIONS).index(p.direction) for p in prompts])
    motion = sample_motion(direction, size, frames, generator, onset)
    return render(prompts, motion, size, frames), motion
