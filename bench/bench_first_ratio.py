"""The first update's policy ratio in bf16 on the CPU: its causes, and the old predictions recomputed.

At the first update the policy equals the rollout policy (LoRA B = 0), so every ratio should be 1. A small
random-weight flow-prediction generator on the shapes world (dim 64, 2 blocks; x0 = x - sigma v, so its
predictions are not bf16 numbers) is rolled out in bf16 and trained in bf16 with autocast (the CUDA
defaults, forced on the CPU). Reported: ``ratio_dev_max`` = max |rho - 1| of CoPO and SDE-GRPO, and NFT's
``old_dev_max`` (the largest relative distance of its current from its old velocity), for

- causes (semi, ``--old-predictions stored``): the buffer stored in fp32, then with only ``x_t``, only
  ``x0_old`` or only the context latents rounded to bf16 (as a bf16 buffer holds them), and the rollout
  with and without autocast;
- before (``stored``: the buffer's predictions, what every run did) and after (``auto``: recomputed under
  the trainer's numerics) in ``--mode semi`` and ``--mode on``.

    python bench/bench_first_ratio.py [--out results/first-update-ratio.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import yaml

from streamalign.buffer.reader import BufferReader
from streamalign.collect.collector import CollectConfig, collect
from streamalign.models.checkpoint import save_safetensors
from streamalign.models.placement import Placement
from streamalign.models.wan import CausalWanModel
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig
from streamalign.train.loop import Trainer, train
from streamalign.worlds.shapes import held_in_prompts

PROMPTS = tuple(p.text for p in held_in_prompts()[::50])
OBJECTIVES = ("copo", "sde-grpo", "nft")
BF16 = {"dtype": "bf16", "autocast": "bf16"}


def flow_config(folder: Path) -> Path:
    """The shapes config at dim 64, 2 blocks, predicting flow (its x0 = x - sigma v is computed in float64)."""
    d = ModelConfig.load("shapes").model_dump(mode="json")
    d["arch"].update(dim=64, ffn_dim=128, num_layers=2, freq_dim=64, prediction="flow")
    path = folder / "shapes-flow.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def random_base(config: Path, folder: Path, seed: int = 3) -> Path:
    """Random weights everywhere (Wan's init zeroes the head: every output would be the same)."""
    torch.manual_seed(seed)
    model = CausalWanModel(ModelConfig.load(config).arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = folder / "base.safetensors"
    save_safetensors(model.state_dict(), path)
    return path


def bf16_buffer(config: Path, base: Path, out: Path, store: str = "auto", autocast: bool = False,
                dtype: torch.dtype = torch.bfloat16) -> Path:  # fmt: skip
    """Two fork groups of 4 branches rolled out with `dtype` weights (under bf16 autocast or not)."""
    policy = Pipeline.load(str(config), base, placement=Placement(torch.device("cpu"), dtype))
    cfg = CollectConfig(prompts=PROMPTS, groups=2, group_size=4, entries_per_shard=2, seed=5, store_dtype=store)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        collect(policy, cfg, out, progress=False)
    return out


def train_config(config: Path, base: Path, objective: str, **kw) -> TrainConfig:
    args = dict(config=str(config), checkpoint=str(base), steps=1, batch_groups=2, lr=1e-4, lora_rank=4,
                lora_alpha=8, save_every=1, threads=1, objective=objective)  # fmt: skip
    return TrainConfig(**{**args, **kw})


def deviation(stats: dict) -> float:
    return stats["old_dev_max"] if "old_dev_max" in stats else stats["ratio_dev_max"]


def first_update(config: Path, base: Path, buffer: Path, objective: str, rounded: tuple[str, ...] = (), **kw) -> float:
    """The first update's deviation on `buffer`, its `rounded` latent fields rounded to bf16 first."""
    trainer = Trainer(train_config(config, base, objective, buffer=str(buffer), **kw).resolve())
    groups = [dataclasses.replace(e, **{f: getattr(e, f).bfloat16().float() for f in rounded})
              for e in BufferReader(buffer, shuffle=0)]  # fmt: skip
    return deviation(trainer.update(0, groups, len(groups), apply=False))


def on_policy(config: Path, base: Path, out: Path, objective: str, **kw) -> float:
    cfg = train_config(config, base, objective, mode="on", prompts=PROMPTS, group_size=4, updates_per_iter=1, **kw)
    train(cfg, out, progress=False, overwrite=True)
    return deviation(json.loads((out / "metrics.jsonl").read_text().splitlines()[0]))


def measure(root: Path) -> dict:
    config = flow_config(root)
    base = random_base(config, root)
    bf16 = bf16_buffer(config, base, root / "bf16")
    fp32_store = bf16_buffer(config, base, root / "bf16-fp32-store", store="fp32")
    cast_store = bf16_buffer(config, base, root / "bf16-autocast", autocast=True)
    fp32 = bf16_buffer(config, base, root / "fp32", dtype=torch.float32)
    causes, table = {}, {}
    for obj in OBJECTIVES:
        stored = {**BF16, "old_predictions": "stored"}
        causes[obj] = {
            "fp32 store": first_update(config, base, fp32_store, obj, **stored),
            "fp32 store, x_t rounded to bf16": first_update(config, base, fp32_store, obj, ("x_t",), **stored),
            "fp32 store, x0_old rounded to bf16": first_update(config, base, fp32_store, obj, ("x0_old",), **stored),
            "fp32 store, context rounded to bf16": first_update(config, base, fp32_store, obj, ("context",),
                                                                **stored),
            "bf16 store (rollout without autocast)": first_update(config, base, bf16, obj, **stored),
            "bf16 store (rollout under autocast)": first_update(config, base, cast_store, obj, **stored),
        }
        table[obj] = {}
        for when, mode in (("before", "stored"), ("after", "auto")):
            hw = {**BF16, "old_predictions": mode}
            table[obj][f"semi {when}"] = first_update(config, base, bf16, obj, **hw)
            table[obj][f"semi fp32 rollouts, bf16 autocast train {when}"] = first_update(
                config, base, fp32, obj, dtype="fp32", autocast="bf16", old_predictions=mode)  # fmt: skip
            table[obj][f"on {when}"] = on_policy(config, base, root / f"on-{obj}-{mode}", obj, **hw)
        table[obj]["fp32 (auto: stored)"] = first_update(config, base, fp32, obj, autocast="off")
    return {"model": "shapes world, dim 64, 2 blocks, flow prediction, random weights; G=4, 2 groups",
            "metric": "ratio_dev_max (copo, sde-grpo) / old_dev_max (nft) at the first update",
            "causes": causes, "before_after": table}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/first-update-ratio.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for part in ("causes", "before_after"):
        print(part)
        for obj, rows in res[part].items():
            for k, v in rows.items():
                print(f"  {obj:9s} {k:50s} {v:.3g}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
