"""Reward throughput on the shapes world: videos/s of every registered reward and of the default composite.

    python bench/bench_rewards.py [--batch 64] [--repeats 5] [--threads 2] [--json-out results/bench_rewards.json]

Videos are rendered ground truth (32x32 px, 12 frames). Each number is the best of `repeats` timed
calls after one warm-up call, all measured in this run.
"""

from __future__ import annotations

import argparse
import time

import torch
from results_file import add_json_out, save

from streamalign.io.results import table
from streamalign.rewards import CompositeReward, Reward, available
from streamalign.worlds.shapes import held_in_prompts, sample_videos
from streamalign.worlds.shapes.rewards import SHAPES_METRICS, SHAPES_REWARDS


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    add_json_out(ap, "bench_rewards")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [held_in_prompts()[i % 252] for i in range(args.batch)]
    videos, _ = sample_videos(prompts, 32, 12, torch.Generator().manual_seed(0))
    texts = [p.text for p in prompts]
    print(f"batch {args.batch} videos of 12x3x32x32, {args.threads} threads, best of {args.repeats}")
    print(f"{'reward':26s} {'videos/s':>10s}")
    rows = []
    for name in available():
        r = Reward(name)
        dt = best_time(lambda r=r: r(videos, texts), args.repeats)
        print(f"{name:26s} {args.batch / dt:10.0f}")
        rows.append([name, args.batch / dt])
    comp = CompositeReward.parse(SHAPES_REWARDS, SHAPES_METRICS)
    dt = best_time(lambda: comp(videos, texts), args.repeats)
    print(f"{'composite + OOD metrics':26s} {args.batch / dt:10.0f}")
    rows.append(["default composite + both OOD metrics", args.batch / dt])
    save(args, {"throughput": table(["reward", "videos/s"], ["{}", "{:.0f}"], rows)})


if __name__ == "__main__":
    main()
