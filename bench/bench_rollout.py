"""Rollout-engine benchmarks (CPU by default, CUDA with --device cuda). Prints ratios measured in one run.

1. Ours vs the reference Self-Forcing pipeline, before and after each speed-up (issue 29): seconds per video
   of a batch-1 rollout on three configs (small, rolling, medium), best of --repeats runs alternated across
   one worker process per variant (the reference's ``CausalInferencePipeline`` from a checkout given with
   --reference; ours at each stage's commit, its ``streamalign`` exported with ``git archive``), the ratio
   of each stage to the one before and to the reference, page faults per video, max |diff| of the latents
   vs the first stage, and the frames/s the FLOP count allows at this CPU's measured matmul rate (the
   achieved fraction). Writes results/bench_rollout.json.
2. Fork group vs independent rollouts (L=4 chunks, G=12, every pivot): measured speed-up vs the
   arithmetic ratio G*L / (p + G*(L-p)) in chunk generations (0-based pivot p).
3. Forward throughput (tokens/s) and peak memory of a chunked rollout for a small and a medium config.
4. ``--compile`` (``--section compile``): eager vs compiled transformer blocks (inductor) on section 1's
   configs, CPU: seconds per video of each, their ratio, the compile time (first rollout) apart, the graphs
   compiled and max |diff| of the latents (bench/rollout_compile.py). ``--threads`` (default 1).

    python bench/bench_rollout.py --reference DIR --reference-deps DIR   # 1 + 2 + 3, ~20 min on 2 cores
    python bench/bench_rollout.py --section stages --reference DIR       # 1 only
    python bench/bench_rollout.py --section compile                      # 4 only, ~10 min on 2 cores
    python bench/bench_rollout.py --json-out results/bench_rollout.json   # where the tables go (the default)

DIR: a Self-Forcing checkout (github guandeh17/Self-Forcing, commit 33593df); its imports need ``einops``
(``pip install --target DEPS einops``, then ``--reference-deps DEPS``). Without --reference, section 1
compares the stages only. A run of some sections keeps the other sections' tables in the results file.

The wan-1.3b rollout at full size on a GPU (seconds per chunk, frames/s, memory vs the plan) is
``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch
from results_file import add_json_out, save
from rollout_compile import compile_table, run_compile
from rollout_stages import CONFIGS, run_stages, stage_tables

from streamalign.io.results import table
from streamalign.models.sampler import Sampler
from streamalign.models.wan import CausalWanModel
from streamalign.schemas.config import ModelConfig

SIZES = {
    "small": dict(
        arch=dict(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_len=32, text_dim=384, freq_dim=64),
        latent=dict(height=16, width=16, frames=12),
    ),
    "medium": dict(
        arch=dict(dim=512, ffn_dim=2048, num_heads=8, num_layers=8, text_len=32, text_dim=384, freq_dim=128),
        latent=dict(height=32, width=32, frames=12),
    ),
}


def make(size: str, device: str, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, Sampler]:
    spec = SIZES[size]
    cfg = ModelConfig.model_validate(dict(name=size, **spec))
    torch.manual_seed(0)
    model = CausalWanModel(cfg.arch).to(device, dtype).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    return cfg, Sampler(model, cfg)


def timed(fn, repeats: int, device: str) -> float:
    """Minimum wall time over `repeats` runs after a warm-up (robust to interference on shared cores);
    repeats=0 times a single run with no warm-up (for calls that mutate state)."""
    if repeats == 0:
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def _chunk_costs(sampler: Sampler, ctx, batches, n: int, repeats: int, device: str) -> dict[int, list[float]]:
    cost = {}
    for b in batches:
        runs = []
        for _ in range(repeats):
            cache, bank = sampler.new_cache(b), sampler.noise_bank(list(range(b)))
            runs.append(
                [timed(lambda j=j, c=cache, k=bank: sampler.denoise_chunk(c, j, k, ctx), 0, device) for j in range(n)]
            )
        cost[b] = [min(r[j] for r in runs) for j in range(n)]
    return cost


def bench_fork(device: str, group: int = 12, repeats: int = 5) -> dict:
    """Independent = G rollouts batched together (the fast baseline), re-measured beside every pivot; the
    results table (one row per pivot, then the mean speed-up)."""
    cfg, sampler = make("small", device)
    n = cfg.num_chunks
    ctx = torch.randn(1, 16, cfg.arch.text_dim, device=device)
    print(f"\n== fork group vs independent rollouts (config small, L={n}, G={group}, {device}) ==")
    # chunk j costs more than chunk 0 (it attends to j earlier chunks): measure per-chunk cost at batch 1
    # and batch G to get the cost-weighted ideal speed-up beside the chunk-count (arithmetic) one
    with torch.no_grad():
        cost = _chunk_costs(sampler, ctx, (1, group), n, repeats, device)
    print(
        "per-chunk ms at batch 1: "
        + ", ".join(f"{c * 1e3:.0f}" for c in cost[1])
        + f"; at batch {group}: "
        + ", ".join(f"{c * 1e3:.0f}" for c in cost[group])
    )
    print("pivot  indep_ms  fork_ms  speedup  arithmetic  efficiency  cost-weighted  efficiency")
    speedups, rows = [], []
    for p in range(n):
        pair = []
        for _ in range(repeats):  # interleave so both see the same machine conditions
            pair.append(
                (
                    timed(lambda: sampler.rollout(ctx, sampler.noise_bank(list(range(group)))), 1, device),
                    timed(lambda p=p: sampler.fork_group(ctx, sampler.noise_bank(0), p, group), 1, device),
                )
            )
        indep, t = min(a for a, _ in pair), min(b for _, b in pair)
        arith = group * n / (p + group * (n - p))
        weighted = sum(cost[group]) / (sum(cost[1][:p]) + sum(cost[group][p:]))
        speedups.append(indep / t)
        rows.append([p, indep * 1e3, t * 1e3, indep / t, arith, indep / t / arith, weighted, indep / t / weighted])
        print(
            f"{p:5d}  {indep * 1e3:8.0f}  {t * 1e3:7.0f}  {indep / t:6.2f}x  {arith:9.2f}x  {indep / t / arith:9.2f}"
            f"  {weighted:12.2f}x  {indep / t / weighted:9.2f}"
        )
    print(f"mean speed-up over pivots: {statistics.mean(speedups):.2f}x")
    rows.append(["mean", None, None, statistics.mean(speedups), None, None, None, None])
    return table(["pivot", "independent", "fork", "speed-up", "arithmetic", "eff.", "cost-weighted", "eff."],
                 ["{}", "{:.0f} ms", "{:.0f} ms", "{:.2f}x", "{:.2f}x", "{:.2f}", "{:.2f}x", "{:.2f}"], rows)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _throughput_worker(size: str, device: str, q) -> None:
    torch.set_num_threads(torch.get_num_threads())
    cfg, sampler = make(size, device)
    ctx = torch.randn(1, 16, cfg.arch.text_dim, device=device)
    rss0 = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS mark (Linux)
        f.write("5")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bank = sampler.noise_bank(0)
    t = timed(lambda: sampler.rollout(ctx, bank), 2, device)
    calls = cfg.num_chunks * (len(sampler.schedule) + 1)  # denoising steps + t=0 refresh per chunk
    tokens = calls * cfg.sampler.chunk_frames * cfg.tokens_per_frame
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else (_rss_kib("VmHWM") - rss0) * 1024
    params = sum(p.numel() for p in sampler.model.parameters())
    q.put((size, params, cfg.tokens_per_frame, tokens / t, t, peak))


def bench_throughput(device: str) -> dict:
    """Tokens/s, rollout seconds and peak memory of each config; the results table."""
    print(
        f"\n== forward throughput, chunked rollout of 12 latent frames ({device}, {torch.get_num_threads()} threads) =="
    )
    print("config   params   tokens/frame  tokens/s   rollout_s  peak_mem_MB")
    ctx = mp.get_context("spawn")
    rows = []
    for size in SIZES:
        q = ctx.Queue()
        proc = ctx.Process(target=_throughput_worker, args=(size, device, q))
        proc.start()
        rows.append(q.get())
        proc.join()
    for size, params, tpf, tps, t, peak in rows:
        print(f"{size:7s} {params / 1e6:6.1f}M  {tpf:12d}  {tps:9.0f}  {t:9.2f}  {peak / 2**20:11.1f}")
    print(f"small/medium tokens/s ratio: {rows[0][3] / rows[1][3]:.1f}x")
    label = {k: f"{k} (dim {v['arch']['dim']}, {v['arch']['num_layers']} layers)" for k, v in SIZES.items()}
    return table(["config", "params", "tokens/frame", "tokens/s", "rollout", "peak memory"],
                 ["{}", "{:.1f} M", "{}", "{:.0f}", "{:.2f} s", "{:.1f} MB"],
                 [[label[size], params / 1e6, tpf, tps, t, peak / 2**20] for size, params, tpf, tps, t, peak in rows])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--group", type=int, default=12)
    ap.add_argument("--section", choices=["all", "stages", "fork", "throughput", "compile"], default="all")
    ap.add_argument("--reference", help="a Self-Forcing checkout: its pipeline is timed beside ours (section 1)")
    ap.add_argument("--reference-deps", help="a folder with the reference's extra imports (einops)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs per variant in section 1 (best kept)")
    ap.add_argument("--configs", default="small,rolling,medium", help="section 1's and 4's configs, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of section 4's workers")
    add_json_out(ap, "bench_rollout")
    args = ap.parse_args()
    if args.reference and not Path(args.reference, "pipeline", "causal_inference.py").is_file():
        sys.exit(f"error: --reference {args.reference}: no pipeline/causal_inference.py; give a Self-Forcing checkout")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        sys.exit(f"error: --configs: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CONFIGS)}")
    if args.section in ("all", "stages") and args.device != "cpu":
        sys.exit("error: section 1 (stages) runs on the CPU only; use --section fork or throughput with --device")
    # the sections not run keep their tables (and data) from the results file, named in the note
    old = json.loads(args.json_out.read_text()) if args.json_out.is_file() else {}
    new, data = {}, dict(old.get("data") or {})
    if args.section in ("all", "stages"):
        configs = tuple(args.configs.split(","))
        data["stages"] = run_stages(args.reference, args.reference_deps, args.repeats, configs=configs)
        new.update(stage_tables(data["stages"]))
    if args.section in ("all", "fork"):
        new["fork"] = bench_fork(args.device, args.group)
    if args.section in ("all", "throughput"):
        new["throughput"] = bench_throughput(args.device)
    if args.section in ("all", "compile"):
        if args.device != "cpu":
            sys.exit("error: section 4 (compile) runs on the CPU; bench/gpu_check.py --compile times it on a GPU")
        data["compile"] = run_compile(tuple(args.configs.split(",")), args.repeats, args.threads)
        new["compile"] = compile_table(data["compile"])
    kept = {k: v for k, v in old.get("tables", {}).items() if k not in new}
    meta = old.get("meta", {})
    note = f"tables {', '.join(kept)} from `{meta.get('command')}` ({meta.get('note', 'no note')})" if kept else ""
    save(args, {**kept, **new}, data or None, note=note)
