"""Replay-buffer benchmarks, all measured in one run on the shapes world:

- collect groups/s (shipped shapes generator, G=12, 4-step sampler, composite + OOD metrics);
- write and read MB/s of whole shards for webdataset and zarr (the groups split over `--shards` shards),
  and streaming reads through ``BufferReader`` in a DataLoader with 0 and 2 workers;
- bytes per entry with context latents vs ``--store-kv`` (pivot 2), and the projection for wan-1.3b
  (21 latent frames of 60x104 = 1560 tokens, 30 layers, G=12, pivot 2) from the same ``Entry.to_record``.

    python bench/bench_buffer.py [--groups 16] [--shards 4] [--threads 2] [--json-out results/bench_buffer.json]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from results_file import add_json_out, save
from torch.utils.data import DataLoader

from streamalign.buffer.formats import FORMATS, get_format, write_shard
from streamalign.buffer.manifest import write_manifest_part
from streamalign.buffer.reader import BufferReader
from streamalign.collect.collector import CollectConfig, collect
from streamalign.io.files import tree_bytes
from streamalign.io.results import table
from streamalign.pipeline import Pipeline
from streamalign.schemas.buffer import Entry
from streamalign.schemas.config import ModelConfig
from streamalign.worlds.shapes import held_in_prompts


def record_bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.to_record()[1].values())


def wan_projection(g: int = 12, pivot: int = 2, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(bytes with context latents, bytes of the stored prefix KV) of one wan-1.3b entry, from meta tensors."""
    cfg = ModelConfig.load("wan-1.3b").with_overrides(latent={"frames": 21})
    c, n, t = cfg.sampler.chunk_frames, cfg.num_chunks, len(cfg.sampler.denoising_steps)
    chw = (cfg.latent.channels, cfg.latent.height, cfg.latent.width)

    def m(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    a = cfg.arch
    s = pivot * c * cfg.tokens_per_frame
    kv = {f"{k}.{i}": m(s, a.num_heads, a.head_dim) for k in "kv" for i in range(a.num_layers)}
    e = Entry(
        entry_id="x", run_id="r", policy_id="p", seed=0, prompt="p", prompt_id="p", config_name=cfg.name,
        arch_id=cfg.arch_id, num_chunks=n, pivot=pivot, strength=0.5, timesteps=[1.0] * t,
        context=m(pivot * c, *chw), eps_star=m(c, *chw), branch_noise=m(g, c, *chw), init_noise=m(n, c, *chw),
        solver_noise=m(n, t - 1, c, *chw), x_t=m(g, t, c, *chw), x0_old=m(g, t, c, *chw),
        branch_latents=m(g, (n - pivot) * c, *chw), rewards={"r": torch.zeros(g)}, reward_weights={"r": 1.0},
    )  # fmt: skip
    base = record_bytes(e)
    e.kv = kv
    return base, record_bytes(e) - base


def main() -> None:
    ap = argparse.ArgumentParser(description="replay-buffer benchmarks")
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    add_json_out(ap, "bench_buffer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_buffer_"))
    try:
        policy = Pipeline.load("shapes")
        prompts = tuple(p.text for p in held_in_prompts())
        cfg = CollectConfig(prompts=prompts, groups=args.groups, group_size=12, entries_per_shard=args.groups)
        t0 = time.perf_counter()
        collect(policy, cfg, tmp / "collected", progress=False)
        dt = time.perf_counter() - t0
        print(f"collect: {args.groups} groups of G=12 in {dt:.1f} s = {args.groups / dt:.2f} groups/s")
        src = next((tmp / "collected").glob("shard-*"))
        entries = list(get_format("webdataset").read(src))

        cols = ("MB total", "write MB/s", "read MB/s", "stream 0w", "stream 2w")
        print(f"\n{args.shards} shards of {len(entries) // args.shards} groups")
        print(f"{'format':11s}" + "".join(f"{c:>11s}" for c in cols))
        per = len(entries) // args.shards
        format_rows = []
        for name, fmt in FORMATS.items():
            folder = tmp / name
            folder.mkdir()
            w = r = 0.0
            size = 0
            for k in range(args.shards):
                part = entries[k * per : (k + 1) * per]
                t0 = time.perf_counter()
                info = write_shard(fmt, folder / f"shard-{k:06d}{fmt.suffix}", part)
                w += time.perf_counter() - t0
                size += info.bytes
                write_manifest_part(folder, part, info)
                t0 = time.perf_counter()
                assert sum(1 for _ in fmt.read(info.path)) == len(part)
                r += time.perf_counter() - t0
            raw = sum(record_bytes(e) for e in entries[: per * args.shards]) / 1e6
            rates = []
            for workers in (0, 2):
                t0 = time.perf_counter()
                k = sum(1 for _ in DataLoader(BufferReader(folder), batch_size=None, num_workers=workers))
                rates.append(raw / (time.perf_counter() - t0))
                assert k == per * args.shards
            vals = (size / 1e6, raw / w, raw / r, *rates)
            print(f"{name:11s}" + "".join(f"{v:11.1f}" for v in vals))
            format_rows.append([name, *vals])
        print("(MB/s of tensor payload, in one process; 'stream Nw' = BufferReader in a DataLoader with N workers)")

        kv_cfg = CollectConfig(prompts=prompts, groups=4, group_size=12, pivot="2", store_kv=True, entries_per_shard=4)
        plain = CollectConfig(prompts=prompts, groups=4, group_size=12, pivot="2", entries_per_shard=4)
        sizes = []
        for label, c in (("context latents", plain), ("--store-kv", kv_cfg)):
            collect(policy, c, tmp / label, progress=False)
            size = tree_bytes(next((tmp / label).glob("shard-*"))) / 4
            sizes.append(size)
            print(f"shapes, pivot 2, G=12, {label:16s}: {size / 1e6:6.2f} MB per entry (fp32, webdataset)")
        base, kv = wan_projection()
        print(
            f"wan-1.3b projection (bf16, G=12, pivot 2): {base / 1e6:.0f} MB per entry with context latents, "
            f"+{kv / 1e6:.0f} MB with --store-kv ({kv / base:.1f}x)"
        )
        entry_rows = [["shapes (fp32, webdataset shard bytes)", sizes[0] / 1e6, (sizes[1] - sizes[0]) / 1e6,
                       (sizes[1] - sizes[0]) / sizes[0]],
                      ["wan-1.3b projection (bf16, 21 latent frames of 1560 tokens, 30 layers), from the same "
                       "`Entry.to_record`", base / 1e6, kv / 1e6, kv / base]]  # fmt: skip
        save(args, {
            "formats": table(["format", "MB total", "write MB/s", "read MB/s (whole shards)", "streaming, 0 workers",
                              "streaming, 2 workers"], ["{}", "{:.1f}", "{:.0f}", "{:.0f}", "{:.0f}", "{:.0f}"],
                             format_rows),
            "entry_bytes": table(["model", "MB per entry with context latents", "MB more with `--store-kv`",
                                  "`--store-kv` / context"], ["{}", "{:.4g}", "{:.4g}", "{:.2f}x"], entry_rows),
        }, data={"collect_groups_per_s": args.groups / dt, "groups": args.groups, "shards": args.shards})  # fmt: skip
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
