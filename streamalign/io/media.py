"""Videos to files: MP4 (H.264 via PyAV) or animated GIF per video, and a PNG grid of frames comparing models
on the same seeds. Videos are ``[F, 3, H, W]``, floats in [0, 1] or uint8 levels (:func:`to_uint8`).

Sizes: small videos (the built-in world's 32 px) are upscaled by nearest neighbour to a readable size; a
video whose longer side is ``>= NATIVE_PX`` is written at its own size (never upscaled). A grid shows at
most ``GRID_FRAMES`` frames per row (evenly spaced, first and last included) and shrinks large frames to
``GRID_THUMB_PX`` on their longer side, so an 81-frame 480x832 video gives a bounded image.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .files import atomic_path

NATIVE_PX = 256  # a source at least this large (longer side) is never upscaled
MEDIA_TARGET_PX = 128  # small videos are upscaled by the integer factor that brings them closest below this
GRID_TARGET_PX = 96  # the same for frames in a grid
GRID_FRAMES = 16  # frames per grid row at most
GRID_THUMB_PX = 256  # frames larger than this (longer side) are shrunk in grids


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Frames in [0, 1] -> uint8 levels ``round(255 x)`` (clamped); uint8 input is returned as is."""
    if frames.dtype == torch.uint8:
        return frames
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


def auto_upscale(height: int, width: int, target: int = MEDIA_TARGET_PX) -> int:
    """Integer nearest-neighbour factor for a frame: 1 for a source >= NATIVE_PX (or >= target), else
    ``target // longer side`` (32 px -> 4 for media, 3 for grids)."""
    side = max(height, width)
    if side >= NATIVE_PX:
        return 1
    return max(1, target // side)


def _images(frames: torch.Tensor, upscale: int | None, target: int = MEDIA_TARGET_PX) -> list[Image.Image]:
    """frames [F, 3, H, W] (float in [0, 1] or uint8) -> PIL images, upscaled by nearest neighbour
    (`upscale` None: :func:`auto_upscale`)."""
    x = to_uint8(frames.detach().cpu()).permute(0, 2, 3, 1).contiguous().numpy()
    s = auto_upscale(x.shape[1], x.shape[2], target) if upscale is None else upscale
    images = [Image.fromarray(f) for f in x]
    return images if s == 1 else [f.resize((f.width * s, f.height * s), Image.NEAREST) for f in images]


def save_gif(video: torch.Tensor, path: str | Path, fps: float = 8.0, upscale: int | None = None) -> Path:
    """video [F, 3, H, W] -> looping GIF (small videos upscaled, see :func:`auto_upscale`)."""
    path = Path(path)
    frames = _images(video, upscale)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = 16.0, upscale: int | None = None) -> Path:
    """video [F, 3, H, W] -> H.264 MP4 (yuv420p; PyAV's bundled ffmpeg, one encoder thread so the bytes
    are reproducible). Small videos are upscaled (see :func:`auto_upscale`); sizes are rounded up to even
    numbers."""
    import av

    frames = _images(video, upscale)
    w, h = frames[0].size
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps), options={"threads": "1", "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for f in frames:
            if f.size != (stream.width, stream.height):
                f = f.resize((stream.width, stream.height), Image.NEAREST)
            for packet in stream.encode(av.VideoFrame.from_image(f)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_mp4(path: str | Path) -> torch.Tensor:
    """Decode an MP4 back to [F, 3, H, W] float in [0, 1] (for checks)."""
    import av

    with av.open(str(path)) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255


def grid_frames(num_frames: int, max_frames: int = GRID_FRAMES) -> list[int]:
    """Indices of the frames a grid row shows: all when at most `max_frames`, else `max_frames` evenly
    spaced ones from the first to the last."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [round(i * (num_frames - 1) / (max_frames - 1)) for i in range(max_frames)]


def _thumbnails(video: torch.Tensor, index: list[int], upscale: int | None) -> list[Image.Image]:
    frames = _images(video[index], upscale, GRID_TARGET_PX)
    w, h = frames[0].size
    if max(w, h) <= GRID_THUMB_PX:
        return frames
    s = GRID_THUMB_PX / max(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return [f.resize(size, Image.BILINEAR) for f in frames]


def frame_grid(
    videos: Mapping[str, torch.Tensor], path: str | Path, upscale: int | None = None, label_width: int = 90,
    caption: str | None = None, max_frames: int = GRID_FRAMES,
) -> Path:  # fmt: skip
    """One row per model (its name on the left) of one video's frames: videos name -> [F, 3, H, W].
    At most `max_frames` frames per row (evenly spaced; the caption then says which); `caption` (e.g. the
    prompt, seed and model) on a strip above the rows, wrapped to the grid's width."""
    n = max(v.shape[0] for v in videos.values())
    index = grid_frames(n, max_frames)
    rows = {name: _thumbnails(v, [i for i in index if i < v.shape[0]], upscale) for name, v in videos.items()}
    w, h = rows[next(iter(rows))][0].size
    width = label_width + len(index) * (w + 2)
    text = caption or ""
    if len(index) < n:
        text += f"{'  ' if text else ''}(frames {', '.join(map(str, index))} of {n})"
    lines = textwrap.wrap(text, max(20, width // 6)) if text else []  # PIL's default font: ~6 px a character
    top = 4 + 12 * len(lines) if lines else 0
    grid = Image.new("RGB", (width, top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(lines):
        draw.text((4, 2 + 12 * k), line, fill="black")
    for i, (name, frames) in enumerate(rows.items()):
        draw.text((4, top + i * (h + 2) + h // 2 - 6), name[:14], fill="black")
        for j, f in enumerate(frames):
            grid.paste(f, (label_width + j * (w + 2), top + i * (h + 2)))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)
