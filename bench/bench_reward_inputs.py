"""What the reward models' input handling changes (issue 28): gray levels and the bytes a decoded group holds.

    python bench/bench_reward_inputs.py [--frames 4] [--out results/reward_inputs.json]

1. Gray: the share of pixels whose 3-channel gray level differs between the former order (torchvision weights
   on float frames, rounded by the later 8-bit resize) and Astrolabe's (8-bit levels first, weights in float32,
   truncated: ``preprocess.grayscale3``), on random 480x832 frames and on shapes-world videos.
2. Bytes of one decoded fork group waiting for its scores in collect (G videos of F x 3 x H x W), as float32
   (before) and as uint8 (now, when every reward reads 8-bit frames), from the tensors' sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamalign.rewards.models.preprocess import GRAY_WEIGHTS, grayscale3
from streamalign.worlds.shapes import held_in_prompts, sample_videos


def gray_shift(frames: torch.Tensor) -> dict:
    """Level differences (Astrolabe minus former) over every pixel of float frames [..., 3, H, W]."""
    r, g, b = frames.unbind(-3)
    former = (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).mul(255).round().clamp(0, 255)
    now = grayscale3(frames)[..., 0, :, :].mul(255).round()
    d = now - former
    return {"pixels": d.numel(), "share_one_level_darker": round(d.eq(-1).float().mean().item(), 4),
            "share_unchanged": round(d.eq(0).float().mean().item(), 4), "max_abs_levels": int(d.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--out", default="results/reward_inputs.json")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (args.frames, 3, 480, 832), generator=g).float() / 255  # 8-bit decoded frames
    prompts = held_in_prompts()[:8]
    shapes, _ = sample_videos(prompts, 32, 12, torch.Generator().manual_seed(0))
    out = {"gray": {"random_480x832": gray_shift(noise), "shapes_32x32": gray_shift(shapes)}}
    group = {"G": 12, "frames": 81, "height": 480, "width": 832}
    shape = (group["G"], group["frames"], 3, group["height"], group["width"])
    out["group_bytes"] = {**group, **{str(dt).split(".")[1]: torch.empty(0, dtype=dt).element_size() * int(
        torch.Size(shape).numel()) for dt in (torch.float32, torch.uint8)}}  # fmt: skip
    print(json.dumps(out, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
