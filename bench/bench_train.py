"""Training benchmarks, measured in one run:

- seconds per semi-on-policy update (replay of `--batch` stored groups) vs per on-policy iteration
  (collect `--batch` fresh groups with the current policy + 2 updates), shipped shapes generator, G=12,
  LoRA r64/a128, CoPO with 4 anchors x 4 steps;
- streaming long tuning: activation memory of a pivot update at the end of ever longer videos with the
  rolling KV window vs a global cache (bounded by the window vs growing with the history);
- activation memory of one pivot-chunk update vs backprop through the whole sequence: bytes of the
  tensors autograd saves for backward (exact, counted with saved_tensors_hooks), for K anchor videos x T
  steps at the pivot vs the same K videos x T steps in every one of the L chunks, both in one run. The
  design promises a ratio <= 1/L (plus the larger attention of late chunks).

    python bench/bench_train.py [--batch 8] [--threads 2]
    python bench/bench_train.py --memory-only     # the memory ratios only (seconds)

The speed table goes to ``--json-out`` (default ``results/bench_train.json``; not with --memory-only), the memory
tables (exact byte counts, independent of the machine's load) beside it, to ``<stem>_memory.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from results_file import add_json_out, save

from streamalign.adapters.lora import LoraSettings, attach_lora
from streamalign.collect.collector import CollectConfig, collect
from streamalign.io.results import table
from streamalign.models.sampler import Sampler
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig
from streamalign.train.loop import train
from streamalign.train.memory import SavedBytes
from streamalign.train.replay import PivotReplay
from streamalign.worlds.shapes import held_in_prompts


def memory(config: str, anchors: int = 4) -> tuple[list[int], int, int]:
    """(pivot-chunk bytes for each pivot 0..L-1, whole-sequence bytes, L) for a random-weight model."""
    cfg = ModelConfig.load(config)
    torch.manual_seed(0)
    from streamalign.models.wan import CausalWanModel

    peft = attach_lora(CausalWanModel(cfg.arch), LoraSettings())
    model = peft.base_model.model
    s = Sampler(model, cfg)
    text = torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim)
    n, t = cfg.num_chunks, len(s.schedule)
    bank = s.noise_bank(list(range(anchors)))
    with torch.no_grad():
        lat = s.rollout(text.expand(anchors, -1, -1), bank)

    # pivot update: prefix rebuilt without grad, K x T pivot inputs with grad
    class E:  # the fields PivotReplay reads
        num_chunks = n

    x_t = torch.randn(anchors * t, *s.chunk_shape)
    per_pivot = []
    for pivot in range(n):
        E.pivot, E.context = pivot, lat[0, : pivot * s.chunk_frames]
        with SavedBytes(model) as pivot_mem:
            PivotReplay(s).predict(E, text, x_t, torch.arange(t).repeat(anchors)).pow(2).mean()
        per_pivot.append(pivot_mem.total)
    # whole sequence: every chunk's T denoising steps of the K videos kept for backward
    with SavedBytes(model) as full_mem:
        cache = s.new_cache(anchors * t, n)
        outs = []
        for j in range(n):
            x = torch.randn(anchors * t, *s.chunk_shape)
            steps = torch.arange(t).repeat(anchors)
            tt = torch.tensor(s.schedule.timesteps)[steps]
            sig = torch.tensor(s.schedule.sigmas, dtype=torch.float64)[steps]
            outs.append(s.predict_x0(x, tt, sig, text, cache, j * s.chunk_frames))
        torch.cat(outs, 1).pow(2).mean()
    return per_pivot, full_mem.total, n


def streaming_memory(lengths=(4, 8, 16, 32), anchors: int = 4) -> list[tuple[int, int, int]]:
    """Streaming long tuning: (chunks, saved bytes with the rolling 12-frame window, with a global cache)
    of one pivot update at the LAST chunk of a video of that many chunks (shapes arch, random weights)."""
    rows = []
    for n in lengths:
        out = []
        for window in (12, None):
            cfg = ModelConfig.load("shapes").with_overrides(latent={"frames": 3 * n}, cache={"window": window})
            torch.manual_seed(0)
            from streamalign.models.wan import CausalWanModel

            model = attach_lora(CausalWanModel(cfg.arch), LoraSettings()).base_model.model
            s = Sampler(model, cfg)
            text = torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim)

            class E:
                pivot, context = n - 1, torch.randn((n - 1) * 3, *s.chunk_shape[1:])

            t = len(s.schedule)
            with SavedBytes(model) as m:
                PivotReplay(s).predict(
                    E, text, torch.randn(anchors * t, *s.chunk_shape), torch.arange(t).repeat(anchors)
                )
            out.append(m.total)
        rows.append((n, *out))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--updates", type=int, default=4)
    ap.add_argument("--memory-only", action="store_true", help="skip the speed runs")
    add_json_out(ap, "bench_train")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.memory_only:
        save(args, {"speed": speed(args)})
    tables = {}
    act = []
    for config in ("shapes", "tiny"):
        ps, f, n = memory(config)
        mean = sum(ps) / len(ps)
        act.append([config, f / 2**20, *(p / 2**20 for p in ps), mean / f, ps[-1] / f, 1 / n])
        print(f"activation memory ({config}, L={n}, 4 anchors x 4 steps): whole sequence {f / 2**20:.1f} MiB; "
              f"pivot update by pivot {', '.join(f'{p / 2**20:.1f}' for p in ps)} MiB; ratio mean over pivots "
              f"{mean / f:.3f}, last pivot {ps[-1] / f:.3f} (1/L = {1 / n:.3f})")  # fmt: skip
    pivots = [f"pivot {p}" for p in range(len(ps))]
    tables["activation"] = table(["config", "whole sequence", *pivots, "mean ratio", "last-pivot ratio", "1/L"],
                                 ["{}", "{:.1f} MiB", *["{:.1f} MiB"] * len(ps), "{:.3f}", "{:.3f}", "{:.3f}"], act)
    print("streaming long tuning, pivot update at the last chunk (shapes arch, 4 anchors x 4 steps):")
    stream = streaming_memory()
    for n, rolling, full in stream:
        print(f"  {n:3d} chunks: rolling window 12 frames {rolling / 2**20:6.1f} MiB | global cache "
              f"{full / 2**20:6.1f} MiB  ({full / rolling:.1f}x)")  # fmt: skip
    tables["streaming"] = table(["video (chunks)", *(str(n) for n, _, _ in stream)], ["{}"] + ["{:.1f}"] * len(stream),
                                [["rolling window, MiB", *(r / 2**20 for _, r, _ in stream)],
                                 ["global cache, MiB", *(g / 2**20 for _, _, g in stream)]])  # fmt: skip
    save(args, tables, path=args.json_out.with_name(f"{args.json_out.stem}_memory.json"))


def speed(args: argparse.Namespace) -> dict:
    """Seconds per semi update and per on-policy iteration; the results table."""
    prompts = tuple(p.text for p in held_in_prompts()[::7])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        collect(Pipeline.load("shapes"), CollectConfig(prompts=prompts, groups=args.batch * 2, group_size=12, seed=1,
                entries_per_shard=args.batch), tmp / "buf", progress=False)  # fmt: skip
        common = dict(batch_groups=args.batch, threads=args.threads, save_every=10**6)
        t0 = time.perf_counter()
        train(
            TrainConfig(mode="semi", buffer=str(tmp / "buf"), steps=args.updates, **common),
            tmp / "semi",
            progress=False,
        )
        semi = (time.perf_counter() - t0) / args.updates
        t0 = time.perf_counter()
        train(TrainConfig(mode="on", prompts=prompts, steps=1, group_size=12, **common), tmp / "on", progress=False)
        on = time.perf_counter() - t0
    print(f"shapes, batch {args.batch} groups of G=12, {args.threads} threads (includes model/adapter set-up):")
    print(f"  semi-on-policy update   {semi:7.2f} s")
    print(
        f"  on-policy iteration     {on:7.2f} s  (collect {args.batch} groups + 2 updates) "
        f"= {on / semi:.1f}x a semi update"
    )
    return table(["", "seconds", "x a semi update"], ["{}", "{:.2f}", "{:.1f}x"],
                 [[f"semi-on-policy update (replay {args.batch} stored groups)", semi, 1.0],
                  [f"on-policy iteration (collect {args.batch} groups + 2 updates)", on, on / semi]])  # fmt: skip


if __name__ == "__main__":
    main()
