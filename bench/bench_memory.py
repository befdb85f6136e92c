"""Fork-group memory at full size and fork-group speed at small size, before vs after a revision.

1. Full size (wan-1.3b / wan-14b presets, 480x832, 81 frames = 21 latents x 1560 tokens, bf16, text
   [1, 512, 4096], G=12, default settings): peak bytes of ONE real ``Sampler.fork_group`` call, measured on
   fake tensors by ``streamalign.models.memory`` (no memory or GPU needed), and the ratio before/after.
2. Speed (small real config, CPU, float32): seconds of a G=12 fork group over L=4 chunks at every pivot,
   before and after, so that sharing the prefix and branch batching do not cost time.

"Before" is the code at `--before` (default: the parent of the commit that added
streamalign/models/memory.py), exported with ``git archive`` to a temporary folder; the current tracker
module is copied into it (it measures, it is not measured), and each measurement runs in a subprocess
with that folder first on the path. "After" is this working tree.

    python bench/bench_memory.py                              # everything (tens of minutes on 2 cores)
    python bench/bench_memory.py --models wan-1.3b --pivots 6 # one full-size case
    python bench/bench_memory.py --skip-memory                # speed only

The tables go to ``--json-out`` (default ``results/bench_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import add_json_out, save

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30

SMALL = dict(
    name="bench-small",
    arch=dict(dim=128, ffn_dim=512, num_heads=4, num_layers=4, text_len=32, text_dim=384, freq_dim=64),
    latent=dict(height=16, width=16, frames=12),
)


# -- workers (run in a subprocess against one code version) -------------------------------------------
def worker_memory(model: str, pivot: int, group: int, flops: bool) -> dict:
    from streamalign.models.memory import fork_group_memory
    from streamalign.schemas.config import ModelConfig

    report = fork_group_memory(ModelConfig.load(model), pivot, group_size=group, flops=flops)
    return {"peak": report.peak, "baseline": report.baseline, "seconds": report.seconds, "flops": report.flops}


def worker_speed(group: int, repeats: int) -> dict:
    import torch

    from streamalign.models.sampler import Sampler
    from streamalign.models.wan import CausalWanModel
    from streamalign.schemas.config import ModelConfig

    cfg = ModelConfig.model_validate(SMALL)
    torch.manual_seed(0)
    model = CausalWanModel(cfg.arch).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.head.weight, std=0.02)
    sampler = Sampler(model, cfg)
    text = torch.randn(1, 7, cfg.arch.text_dim)
    out = {}
    for pivot in range(cfg.num_chunks):
        sampler.fork_group(text, sampler.noise_bank(0), pivot, group)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sampler.fork_group(text, sampler.noise_bank(0), pivot, group)
            times.append(time.perf_counter() - t0)
        out[str(pivot)] = min(times)  # the minimum is robust to other jobs on shared cores
    return out


# -- driver ---------------------------------------------------------------------------------------------
def default_before() -> str:
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "--", "streamalign/models/memory.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not added:
        raise SystemExit("cannot find the commit that added streamalign/models/memory.py; give --before REV")
    return added[-1] + "^"


def export_before(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "streamalign"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    shutil.copy(ROOT / "streamalign/models/memory.py", into / "streamalign/models/memory.py")
    return into


def run_worker(code: Path, threads: int, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    if res.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="git revision of the 'before' code")
    ap.add_argument("--models", nargs="+", default=["wan-1.3b", "wan-14b"])
    ap.add_argument("--pivots", nargs="+", type=int, default=[0, 6])
    ap.add_argument("--group", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the speed runs")
    ap.add_argument("--flops", action="store_true", help="also count the after-run's FLOPs (slower)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    add_json_out(ap, "bench_memory")
    args = ap.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "memory":
            print(json.dumps(worker_memory(rest[0], int(rest[1]), int(rest[2]), rest[3] == "1")))
        else:
            import torch

            torch.set_num_threads(int(rest[2]))
            print(json.dumps(worker_speed(int(rest[0]), int(rest[1]))))
        return

    from streamalign.io.results import table  # the working tree's (workers import the measured code)

    rev = args.before or default_before()
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        before = export_before(rev, Path(tmp))
        short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True)
        print(f"before: {rev} ({short.stdout.strip()}); after: working tree")
        if not args.skip_memory:
            print(f"\nfull-size fork group, G={args.group}, 480x832 / 81 frames, bf16, peak GiB (fake tensors)")
            print(
                f"{'model':10s} {'pivot':>5s} {'before':>8s} {'after':>8s} {'ratio':>6s}   simulated s (before / after)"
            )
            rows = []
            for model in args.models:
                for pivot in args.pivots:
                    b = run_worker(before, 1, "memory", model, str(pivot), str(args.group), "0")
                    a = run_worker(ROOT, 1, "memory", model, str(pivot), str(args.group), str(int(args.flops)))
                    fl = f"   {a['flops'] / 1e15:.2f} PFLOP" if a["flops"] is not None else ""
                    print(
                        f"{model:10s} {pivot:5d} {b['peak'] / GIB:8.2f} {a['peak'] / GIB:8.2f} "
                        f"{b['peak'] / a['peak']:6.2f}   {b['seconds']:.0f} / {a['seconds']:.0f}{fl}",
                        flush=True,
                    )
                    rows.append([f"{model} / {pivot}", b["peak"] / GIB, a["peak"] / GIB, b["peak"] / a["peak"]])
            tables["fork_memory"] = table(["model / pivot", "before", "after", "ratio"],
                                          ["{}", "{:.1f} GiB", "{:.1f} GiB", "{:.2f}x"], rows)  # fmt: skip
        if not args.skip_speed:
            print(
                f"\nfork group speed, small config (dim 128, 4 layers, 16x16 latents, L=4), G={args.group}, "
                f"{args.threads} thread(s), min of {args.repeats}"
            )
            b = run_worker(before, args.threads, "speed", str(args.group), str(args.repeats), str(args.threads))
            a = run_worker(ROOT, args.threads, "speed", str(args.group), str(args.repeats), str(args.threads))
            print(f"{'pivot':>5s} {'before s':>9s} {'after s':>9s} {'after/before':>12s}")
            for p in b:
                print(f"{p:>5s} {b[p]:9.3f} {a[p]:9.3f} {a[p] / b[p]:12.2f}")
            tb, ta = sum(b.values()), sum(a.values())
            print(f"{'all':>5s} {tb:9.3f} {ta:9.3f} {ta / tb:12.2f}")
            cols = ["pivot", "before s", "after s", "after/before"]
            tables["speed"] = table(cols, ["{}", "{:.3f}", "{:.3f}", "{:.2f}"],
                                    [[p, b[p], a[p], a[p] / b[p]] for p in b] + [["all", tb, ta, ta / tb]])  # fmt: skip
        save(args, tables, data={"before": rev})


if __name__ == "__main__":
    main()
