"""Rollout-engine benchmarks (CPU by default, CUDA with --device cuda). Prints ratios measured in one run.

1. Fork group vs independent rollouts (L=4 chunks, G=12, every pivot): measured speed-up vs the
   arithmetic ratio G*L / (p + G*(L-p)) in chunk generations (0-based pivot p).
2. Forward throughput (tokens/s) and peak memory of a chunked rollout for a small and a medium config.

    python bench/bench_rollout.py            # 1 + 2 on CPU, a few minutes on 2 cores
    python bench/bench_rollout.py --json-out results/bench_rollout.json   # where the tables go (the default)

The wan-1.3b rollout at full size on a GPU (seconds per chunk, frames/s, memory vs the plan) is
``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import torch
from results_file import add_json_out, save

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
    add_json_out(ap, "bench_rollout")
    args = ap.parse_args()
    save(args, {"fork": bench_fork(args.device, args.group), "throughput": bench_throughput(args.device)})
