"""N gloo ranks against one process: ``train --mode semi`` on a 4-group shapes buffer (random-weight base,
2 groups per shard) with one process and under torchrun, at global batches smaller than the buffer; the
largest parameter difference of the two adapters and of the two loss curves. Writes results/ranks.json.

    python bench/bench_ranks.py [--cases 2x2,3x3,2x4] [--steps 2] [--lr 1e-3]

A case RxB is R ranks at ``--batch-groups B``. The tests' bound is 5% of one Adam step (lr 1e-3: 5e-5);
before the global batch was one process's (ranks read their own shards), 2x2 gave 2.9e-3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from streamalign.collect.collector import CollectConfig, collect
from streamalign.models.checkpoint import save_safetensors
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.worlds.shapes import held_in_prompts

ROOT = Path(__file__).resolve().parents[1]


def _random_base(path: Path) -> None:
    """The tests' random-weight shapes generator (every weight perturbed: branches differ)."""
    import torch

    from streamalign.models.wan import CausalWanModel

    torch.manual_seed(3)
    model = CausalWanModel(ModelConfig.load("shapes").arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_safetensors(model.state_dict(), path)


def _train(args: list[str], out: Path, ranks: int) -> tuple[dict, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(ranks)]  # fmt: skip
    r = subprocess.run([*launch, "-m", "streamalign.cli", "-q", *args, "--out", str(out)], env=env,
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="2x2,3x3,2x4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _random_base(tmp / "base.safetensors")
        prompts = tuple(p.text for p in held_in_prompts()[::50])
        cfg = CollectConfig(prompts=prompts, groups=4, group_size=4, entries_per_shard=2, seed=5)
        collect(Pipeline.load("shapes", tmp / "base.safetensors"), cfg, tmp / "buf", progress=False)
        for case in a.cases.split(","):
            ranks, batch = (int(x) for x in case.split("x"))
            args = ["train", "--buffer", str(tmp / "buf"), "--checkpoint", str(tmp / "base.safetensors"), "--steps",
                    str(a.steps), "--batch-groups", str(batch), "--lr", str(a.lr), "--lora-rank", "4",
                    "--lora-alpha", "8", "--threads", "1"]  # fmt: skip
            one, l1 = _train(args, tmp / f"one-{case}", 1)
            many, ln = _train(args, tmp / f"many-{case}", ranks)
            worst = max(float((one[k] - many[k]).abs().max()) for k in one)
            row = {"ranks": ranks, "batch_groups": batch, "buffer_groups": 4, "steps": a.steps, "lr": a.lr,
                   "adapter_max_abs_diff": worst, "adam_step_fraction": worst / a.lr,
                   "loss_one": l1, "loss_ranks": ln}  # fmt: skip
            print(json.dumps(row))
            rows.append(row)
    out = ROOT / "results" / "ranks.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"bench": "bench/bench_ranks.py", "cases": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
