"""``--shard-base`` (FSDP2, the frozen base sharded over 2 gloo ranks on the CPU) trains the same adapter as
one process, on groups whose prefixes differ in length between the ranks and with groups without reward
variance (their replay skipped), rows in micro-batches and blocks checkpointed: every rank still runs the
same model passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from streamalign.buffer.reader import BufferReader
from streamalign.collect.collector import CollectConfig, collect
from streamalign.models.checkpoint import save_safetensors
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig
from streamalign.train.objectives.base import group_rewards
from streamalign.worlds.shapes import held_in_prompts
from tests.conftest import free_port, make_model, torchrun

PROMPTS = tuple(p.text for p in held_in_prompts()[::50])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def test_sharded_base_on_two_gloo_ranks_trains_the_adapter_of_one_process(tmp_path):
    base = tmp_path / "base.safetensors"
    save_safetensors(make_model(ModelConfig.load("shapes"), seed=3).state_dict(), base)
    plugin = Path(__file__).resolve().parent / "flat_reward.py"
    cfg = CollectConfig(prompts=PROMPTS, groups=4, group_size=4, entries_per_shard=2, seed=6, rewards="flat=1",
                        reward_plugins=f"flat={plugin}:make")  # fmt: skip
    collect(Pipeline.load("shapes", base), cfg, tmp_path / "buf", progress=False)
    reader = BufferReader(tmp_path / "buf", shuffle=64, seed=0)  # as train reads it: one process's stream
    reader.set_epoch(0)
    first = [(e.pivot, group_rewards(e)[1]["zero_variance"]) for e in reader]  # (pivot, no reward variance)
    pairs = list(zip(first[:2], first[2:], strict=True))  # the first update's groups: rank 0's beside rank 1's
    assert any(a[0] != b[0] for a, b in pairs)  # the ranks' prefixes differ in length
    assert any(a[1] != b[1] for a, b in pairs)  # one rank replays while the other has nothing to replay
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--buffer", str(tmp_path / "buf"), "--checkpoint", str(base), "--steps", "2", "--batch-groups",
            "4", "--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "streamalign.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    # micro-batched rows and checkpointed blocks (the CUDA defaults): FSDP2 forwards inside the backward
    sharded = ["--shard-base", "--replay-batch", "3", "--checkpointing", "on", "--out", str(tmp_path / "two")]
    two = subprocess.run([*torchrun(2), "-m", "streamalign.cli", *args, *sharded], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert "sharded over 2 ranks with FSDP2" in two.stderr
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert all(r["zero_variance_groups"] >= 1 for r in ra)  # some groups skip their replay
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 0.05 * 1e-3, worst  # as the replicated 2-rank run: within 5% of one Adam step (lr 1e-3)
    # the first update's loss is ~0 (ratio 1): micro-batching changes its rounding at 3e-9
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5, abs=1e-8)
    assert [r["zero_variance_groups"] for r in ra] == [r["zero_variance_groups"] for r in rb]


def test_shard_base_is_for_updates_from_a_buffer():
    with pytest.raises(ValueError, match="--shard-base runs the updates of --mode semi only"):
        TrainConfig(mode="on", shard_base=True)
    with pytest.raises(ValueError, match="--shard-base runs the updates of --mode semi only"):
        TrainConfig(buffer="b", shard_base=True, eval_every=2)


@pytest.mark.slow
def test_each_rank_reads_only_its_shard_of_the_base(tmp_path):
    """``--shard-base`` loads the base straight into shards: on 3 gloo ranks (uneven splits) every tensor of a rank is
    its ``torch.chunk`` of the tensor one process loads (bf16, from .safetensors and from a .pt), and no
    tensor of the safetensors file is read whole by any rank (rows only)."""
    import torch
    import torch.multiprocessing as mp

    from streamalign.models.checkpoint import load_generator
    from tests import dist_workers

    sd = make_model(ModelConfig.load("shapes"), seed=4).state_dict()
    save_safetensors(sd, tmp_path / "base.safetensors")
    torch.save({"generator_ema": {f"model.{k}": v for k, v in sd.items()}}, tmp_path / "base.pt")
    paths = [str(tmp_path / "base.safetensors"), str(tmp_path / "base.pt")]
    full = load_generator("shapes", paths[0], dtype=torch.bfloat16).state_dict()
    for world in (3,):  # 2 ranks: the training test above
        out = mp.Manager().dict()
        mp.spawn(dist_workers.load_shards, args=(world, free_port(), paths, out), nprocs=world)
        for rank in range(world):
            local, whole = out[rank]
            assert whole == [], whole  # every tensor read by rows
            for per_file in local:
                assert per_file.keys() == full.keys()
                for k, w in full.items():
                    want = torch.chunk(w, world)[rank] if rank < len(torch.chunk(w, world)) else w[:0]
                    assert per_file[k].dtype == torch.bfloat16 and torch.equal(per_file[k], want), (world, rank, k)


@pytest.mark.slow
def test_plan_models_the_sharded_base():
    """``plan --shard-base --gpus 2``: the replicated update's peak with the base weights replaced by a rank's
    half of them plus, in full, the root's weights and two blocks (FSDP2's gathered root, running block and
    prefetched block), counted here from a real model's parameters; one GPU shards nothing."""
    import math

    import torch
    from typer.testing import CliRunner

    from streamalign.cli import app

    def update_peak(*extra: str) -> int:
        args = ["plan", "-c", "shapes", "--stages", "train", "--pivot", "1", "--replay-batch", "4", "--json", *extra]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["stages"]["train"]["phases"][1]["peak"]

    model = make_model(ModelConfig.load("shapes")).to(torch.bfloat16)  # plan's default --dtype bf16

    def nbytes(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    weights, block = nbytes(model), max(nbytes(b) for b in model.blocks)
    root = weights - sum(nbytes(b) for b in model.blocks)
    replicated = update_peak("--gpus", "2")
    sharded = replicated - weights + math.ceil(weights / 2) + root + 2 * block
    assert update_peak("--gpus", "2", "--shard-base") == sharded
    assert update_peak("--gpus", "1", "--shard-base") == replicated
