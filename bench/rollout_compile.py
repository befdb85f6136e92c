"""Section ``compile`` of bench/bench_rollout.py: eager vs ``--compile`` (torch.compile of the transformer
blocks, inductor, :mod:`streamalign.models.compiled`) on the configs of section 1, on the CPU.

One worker process per config (a fresh inductor cache folder each, so the compile time is a cold one)
builds the config's random weights twice, eager and compiled (the same weights). The first compiled
rollout compiles its graphs: its seconds, less a steady compiled rollout's, are the compile time, reported
apart from the steady-state times. Then the two alternate for ``repeats`` batch-1 rollouts each (best
kept); the worker reports both seconds per video (wall, and this process's CPU seconds: on cores shared with
other work the wall time also counts the time the process waited for a core), their ratios, the graphs
compiled (one per region and batch shape: 3 here) and the max |diff| of the latents.
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

    def run(s: Sampler) -> tuple[float, float, torch.Tensor]:
        """(wall seconds, this process's CPU seconds, latents) of one rollout."""
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = s.rollout(text, s.noise_bank([0]))
        return time.perf_counter() - t0, time.process_time() - c0, out

    first, _, _ = run(comp)  # compiles
    run(eager)  # warm-up
    wall, cpu = {"eager": float("inf"), "compiled": float("inf")}, {"eager": float("inf"), "compiled": float("inf")}
    outs = {}
    for r in range(repeats):  # alternated, each round in turn first
        for key, s in (("eager", eager), ("compiled", comp))[:: 1 if r % 2 == 0 else -1]:
            t, c, outs[key] = run(s)
            wall[key], cpu[key] = min(wall[key], t), min(cpu[key], c)
    q.put(dict(
        config=name, frames=cfg.latent.frames, eager_s=wall["eager"], compiled_s=wall["compiled"],
        speedup=wall["eager"] / wall["compiled"], eager_cpu_s=cpu["eager"], compiled_cpu_s=cpu["compiled"],
        cpu_speedup=cpu["eager"] / cpu["compiled"], first_compiled_s=first, compile_s=first - wall["compiled"],
        backend_s=stats.seconds, graphs=stats.total, max_abs_diff=(outs["eager"] - outs["compiled"]).abs().max().item(),
    ))  # fmt: skip


def run_compile(configs: tuple[str, ...] = tuple(CONFIGS), repeats: int = 3, threads: int = 1) -> dict:
    """Eager vs compiled on each of `configs` (one worker each); prints the table, returns the numbers."""
    ctx = mp.get_context("spawn")
    rows = []
    print(f"\n== eager vs --compile (inductor, CPU, {threads} thread(s), best of {repeats} alternated rollouts) ==")
    print("config    eager s/video  compiled s/video  speed-up  CPU s eager  CPU s compiled  speed-up  compile s"
          "  graphs  max|diff|")  # fmt: skip
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
              f"  {row['eager_cpu_s']:11.3f}  {row['compiled_cpu_s']:14.3f}  {row['cpu_speedup']:7.2f}x"
              f"  {row['compile_s']:9.1f}  {row['graphs']:6d}  {row['max_abs_diff']:9.1e}")  # fmt: skip
    return {"repeats": repeats, "threads": threads, "configs": rows}


def compile_table(results: dict) -> dict:
    """The results table of :func:`run_compile`'s numbers."""
    from streamalign.io.results import table

    return table(
        ["config", "eager s / video", "compiled s / video", "eager / compiled", "eager CPU s", "compiled CPU s",
         "eager / compiled (CPU s)", "compile s (first rollout)", "graphs", "max abs diff"],
        ["{}", "{:.3f}", "{:.3f}", "{:.2f}x", "{:.3f}", "{:.3f}", "{:.2f}x", "{:.1f}", "{}", "{:.1e}"],
        [[r["config"], r["eager_s"], r["compiled_s"], r["speedup"], r["eager_cpu_s"], r["compiled_cpu_s"],
          r["cpu_speedup"], r["compile_s"], r["graphs"], r["max_abs_diff"]] for r in results["configs"]],
    )  # fmt: skip
