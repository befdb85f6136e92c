"""Training memory at real size, and what ``streamalign plan`` says of an H100, measured on fake tensors.

1. ``train_memory``: the peak of ONE training update (``Trainer.update`` of one G=12 group, the steady state:
   an update after the first, holding AdamW's moments) at full size (wan-1.3b / wan-14b, 480x832, 81 frames),
   default settings resolved as on CUDA (bf16 weights, bf16 autocast by CUDA's rules, LoRA r64, activation
   checkpointing), for CoPO, NFT and SDE-GRPO, with the replay batch chosen at the NO-DEVICE budget (replay
   rows may hold 24 GiB beyond what is held: ``models/sampler.py`` ``DEFAULT_REPLAY_MEMORY``, what a run
   without a GPU to ask uses).
2. ``h100``: the plan of the collect and train stages (CoPO) on an H100 80GB (79.1 GiB), ``streamalign plan
   -c MODEL --gpu h100 --stages collect,train --pivot P``: the stage peaks with what the stage holds besides
   (VAE; text encoder when kept), the branch / replay batch taken from 90% of the free memory, and the
   headroom left after the 1 GiB CUDA reserve.

    python bench/bench_plan_memory.py                     # both models, pivots 0 and 6 (~30 min on 2 cores)
    python bench/bench_plan_memory.py --models wan-1.3b   # one model

The tables go to ``--json-out`` (default ``results/train_memory.json``); render them with
``python bench/render_results.py``.
"""

from __future__ import annotations

import argparse
import time

from results_file import add_json_out, save

GIB = 2**30
OBJECTIVES = ("copo", "nft", "sde-grpo")


def train_rows(models: list[str], pivots: list[int]) -> list[list]:
    from streamalign.train.config import TrainConfig
    from streamalign.train.memory import SIMULATED, train_update_memory

    rows = []
    for name in models:
        for pivot in pivots:
            peaks, batch = [], None
            for objective in OBJECTIVES:
                t = time.perf_counter()
                rep = train_update_memory(name, TrainConfig(buffer=SIMULATED, objective=objective), pivot=pivot)
                peaks.append(rep.peak / GIB)
                batch = rep.notes["replay_batch"] if objective == "copo" else batch
                print(f"{name} / {pivot} {objective}: {rep.peak / GIB:.2f} GiB, replay batch "
                      f"{rep.notes['replay_batch']} ({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
            rows.append([f"{name} / {pivot}", *peaks, batch])
    return rows


def h100_rows(models: list[str], pivots: list[int]) -> list[list]:
    from streamalign.plan import CUDA_RESERVE, PlanRun, plan

    rows = []
    for name in models:
        for pivot in pivots:
            t = time.perf_counter()
            run = PlanRun.build(config=name, gpu="h100", stages=("collect", "train"), pivot=pivot)
            p = plan(run)
            collect, train = p.stages["collect"], p.stages["train"]
            memory = run.memory
            branch = max((ph.batch or 0) for ph in collect.phases if ph.name.startswith("fork group"))
            replay = train.notes["replay_batch"][pivot]
            rows.append([f"{name} / {pivot}", memory / GIB, collect.peak / GIB, branch, train.peak / GIB, replay,
                         (memory - CUDA_RESERVE - max(collect.peak, train.peak)) / GIB])  # fmt: skip
            print(f"{name} / {pivot} on an H100: collect {collect.peak / GIB:.2f} GiB (branch batch {branch}), "
                  f"train {train.peak / GIB:.2f} GiB (replay batch {replay}) "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["wan-1.3b", "wan-14b"])
    ap.add_argument("--pivots", nargs="+", type=int, default=[0, 6])
    add_json_out(ap, "train_memory")
    args = ap.parse_args()
    from streamalign.io.results import table

    h100 = h100_rows(args.models, args.pivots)
    peaks = train_rows(args.models, args.pivots)
    gib = "{:.1f} GiB"
    tables = {
        "peaks": table(["model / pivot", "CoPO (4 anchors x 4 steps)", "NFT (12 branches)",
                        "SDE-GRPO (4 x 3 transitions)", "replay batch (CoPO)"],
                       ["{}", gib, gib, gib, "{:.0f}"], peaks),
        "h100": table(["model / pivot", "GPU memory", "collect peak", "branch batch", "train peak (CoPO)",
                       "replay batch", "headroom"],
                      ["{}", gib, gib, "{:.0f}", gib, "{:.0f}", gib], h100),
    }  # fmt: skip
    save(args, tables, note="fake tensors; steady-state update, bf16 autocast by CUDA's rules, flash backward "
         "scratch counted; peaks: replay rows at the 24 GiB no-device budget; h100: streamalign plan --gpu h100")


if __name__ == "__main__":
    main()
