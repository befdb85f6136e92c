"""Section ``compile`` of bench/bench_rollout.py: eager vs ``--compile`` (torch.compile of the transformer
blocks, inductor, :mod:`streamalign.models.compiled`) on the configs of section 1, on the CPU.

One worker process per config (a fresh inductor cache folder each, so the compile time is a cold one)
builds the config's random weights twice, eager and compiled (the same weights). The first compiled
rollout compiles its graphs: its seconds, less a steady compiled rollout's, are the compile time, reported
apart from the steady-state times. Then the two alternate for ``repeats`` batch-1 rollouts each (best
kept); the worker reports both seconds per video, their ratio, the graphs compiled (one per region and batch
shape: 3 here) and the max |diff| of the latents.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import tempfile
import time

import torch
from rollout_stages import CONFIGS, _build


def _worker(name: str, repeats: int, threads: int, q) -> None:
    torch.set_num_threads(threads)
    from streamalign.models.compiled import compile_blocks
    from streamalign.models.sampler import Sampler

    cfg, eager, text = _build(name)
    model = copy.deepcopy(eager.model)
    stats = compile_blocks(model)
    comp = Sampler(model, cfg)

    def run(s: Sampler) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = s.rollout(text, s.noise_bank([0]))
        return time.perf_counter() - t0, out

    first, _ = run(comp)  # compiles
    run(eager)  # warm-up
    best = {"eager": float("inf"), "compiled": float("inf")}
    outs = {}
    for r in range(repeats):  # alternated, each round in turn first
        for key, s in (("eager", eager), ("compiled", comp))[:: 1 if r % 2 == 0 else -1]:
            t, outs[key] = run(s)
            best[key] = min(best[key], t)
    q.put(dict(
        config=name, frames=cfg.latent.frames, eager_s=best["eager"], compiled_s=best["compiled"],
        speedup=best["eager"] / best["compiled"], first_compiled_s=first, compile_s=first - best["compiled"],
        backend_s=stats.seconds, graphs=stats.total, max_abs_diff=(outs["eager"] - outs["compiled"]).abs().max().item(),
    ))  # fmt: skip


def run_compile(configs: tuple[str, ...] = tuple(CONFIGS), repeats: int = 3, threads: int = 1) -> dict:
    """Eager vs compiled on each of `configs` (one worker each); prints the table, returns the numbers."""
    ctx = mp.get_context("spawn")
    rows = []
    print(f"\n== eager vs --compile (inductor, CPU, {threads} thread(s), best of {repeats} alternated rollouts) ==")
    print("config    eager s/video  compiled s/video  speed-up  compile s  graphs  max|diff|")
    for name in configs:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, not one from an earlier run's cache
            q = ctx.Queue()
            proc = ctx.Process(target=_worker, args=(name, repeats, threads, q))
            proc.start()
            row = q.get()
            proc.join()
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        rows.append(row)
        print(f"{name:8s}  {row['eager_s']:13.3f}  {row['compiled_s']:16.3f}  {row['speedup']:7.2f}x"
              f"  {row['compile_s']:9.1f}  {row['graphs']:6d}  {row['max_abs_diff']:9.1e}")  # fmt: skip
    return {"repeats": repeats, "threads": threads, "configs": rows}


def compile_table(results: dict) -> dict:
    """The results table of :func:`run_compile`'s numbers."""
    from streamalign.io.results import table

    return table(
        ["config", "eager s / video", "compiled s / video", "eager / compiled", "compile s (first rollout)",
         "graphs", "max abs diff"],
        ["{}", "{:.3f}", "{:.3f}", "{:.2f}x", "{:.1f}", "{}", "{:.1e}"],
        [[r["config"], r["eager_s"], r["compiled_s"], r["speedup"], r["compile_s"], r["graphs"], r["max_abs_diff"]]
         for r in results["configs"]],
    )  # fmt: skip
