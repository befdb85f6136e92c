"""Videos to files: MP4 (H.264 via PyAV) or animated GIF per video, and a PNG grid of frames comparing models
on the same seeds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .files import atomic_path


def _to_uint8(frames: torch.Tensor, upscale: int) -> list[Image.Image]:
    """frames [F, 3, H, W] in [0, 1] -> PIL images upscaled by nearest neighbour."""
    x = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(f).resize((f.shape[1] * upscale, f.shape[0] * upscale), Image.NEAREST) for f in x]


def save_gif(video: torch.Tensor, path: str | Path, fps: float = 8.0, upscale: int = 4) -> Path:
    """video [F, 3, H, W] in [0, 1] -> looping GIF."""
    path = Path(path)
    frames = _to_uint8(video, upscale)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def save_mp4(video: torch.Tensor, path: str | Path, fps: float = 16.0, upscale: int = 4) -> Path:
    """video [F, 3, H, W] in [0, 1] -> H.264 MP4 (yuv420p; PyAV's bundled ffmpeg, one encoder thread so the
    bytes are reproducible). Sizes are upscaled by nearest neighbour and rounded up to even numbers."""
    import av

    frames = _to_uint8(video, upscale)
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


def frame_grid(
    videos: Mapping[str, torch.Tensor], path: str | Path, upscale: int = 3, label_width: int = 90,
    caption: str | None = None,
) -> Path:  # fmt: skip
    """One row per model (label on the left), every frame of one video per row: videos name -> [F, 3, H, W];
    `caption` (e.g. the prompt and seed) on a strip above the rows."""
    rows = {name: _to_uint8(v, upscale) for name, v in videos.items()}
    w, h = rows[next(iter(rows))][0].size
    n = max(len(r) for r in rows.values())
    top = 16 if caption else 0
    grid = Image.new("RGB", (label_width + n * (w + 2), top + len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(grid)
    if caption:
        draw.text((4, 2), caption, fill="black")
    for i, (name, frames) in enumerate(rows.items()):
        draw.text((4, top + i * (h + 2) + h // 2 - 6), name[:14], fill="black")
        for j, f in enumerate(frames):
            grid.paste(f, (label_width + j * (w + 2), top + i * (h + 2)))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return Path(path)
