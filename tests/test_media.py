"""Media at real size: only small videos are upscaled, grids show a bounded number of frames (and shrink
large ones), captions wrap; uint8 frames write the same files as the float frames they quantise."""

from __future__ import annotations

import torch
from PIL import Image

from streamalign.io.media import (
    GRID_FRAMES,
    GRID_THUMB_PX,
    auto_upscale,
    frame_grid,
    grid_frames,
    read_mp4,
    save_gif,
    save_mp4,
    to_uint8,
)


def test_only_small_videos_are_upscaled():
    assert auto_upscale(32, 32) == 4 and auto_upscale(32, 32, target=96) == 3  # the shapes world, as before
    assert auto_upscale(64, 48) == 2 and auto_upscale(100, 100) == 1
    assert auto_upscale(256, 256) == auto_upscale(480, 832) == auto_upscale(200, 300) == 1  # never a real video


def test_mp4_and_gif_keep_real_sizes_and_take_uint8(tmp_path):
    big = torch.rand(3, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    assert read_mp4(save_mp4(big, tmp_path / "big.mp4")).shape == (3, 3, 256, 320)
    small = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert read_mp4(save_mp4(small, tmp_path / "small.mp4")).shape == (2, 3, 128, 128)
    save_gif(small, tmp_path / "f.gif")
    save_gif(to_uint8(small), tmp_path / "u.gif")
    assert (tmp_path / "f.gif").read_bytes() == (tmp_path / "u.gif").read_bytes()


def test_grids_subsample_frames_shrink_large_ones_and_wrap_captions(tmp_path):
    assert grid_frames(12) == list(range(12))
    idx = grid_frames(81)
    assert len(idx) == GRID_FRAMES and idx[0] == 0 and idx[-1] == 80 and idx == sorted(set(idx))
    videos = {"base": torch.rand(81, 3, 48, 80), "merged": torch.rand(81, 3, 48, 80)}
    caption = "a red circle moving left on a gray background, seed 7, model merged " * 4
    with Image.open(frame_grid(videos, tmp_path / "g.png", caption=caption)) as im:
        w, h = im.size
    assert w == 90 + GRID_FRAMES * (80 + 2)  # 16 of 81 frames, at their size (96 // 80 = 1), 2 px apart
    assert h > 2 * (48 + 2) + 16  # the caption needed more than one line
    real = {"base": torch.zeros(3, 3, 480, 832, dtype=torch.uint8)}
    with Image.open(frame_grid(real, tmp_path / "r.png")) as im:
        assert im.size == (90 + 3 * (GRID_THUMB_PX + 2), round(480 * GRID_THUMB_PX / 832) + 2)
    a = frame_grid({"m": torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))}, tmp_path / "a.png")
    b = frame_grid({"m": to_uint8(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))},
                   tmp_path / "b.png")  # fmt: skip
    assert a.read_bytes() == b.read_bytes()
