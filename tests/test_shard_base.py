"""``--shard-base`` (FSDP2, the frozen base sharded over 2 gloo ranks on the CPU) trains the same adapter as
one process, on groups whose prefixes differ in length between the ranks and with groups without reward
variance (their replay skipped): every rank still runs the same model passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from streamalign.buffer.manifest import read_manifest
from streamalign.collect.collector import CollectConfig, collect
from streamalign.models.checkpoint import save_safetensors
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig
from streamalign.worlds.shapes import held_in_prompts
from tests.conftest import make_model

PROMPTS = tuple(p.text for p in held_in_prompts()[::50])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def test_sharded_base_on_two_gloo_ranks_trains_the_adapter_of_one_process(tmp_path):
    base = tmp_path / "base.safetensors"
    save_safetensors(make_model(ModelConfig.load("shapes"), seed=3).state_dict(), base)
    plugin = Path(__file__).resolve().parent / "flat_reward.py"
    cfg = CollectConfig(prompts=PROMPTS, groups=4, group_size=4, entries_per_shard=2, seed=5, rewards="flat=1",
                        reward_plugins=f"flat={plugin}:make")  # fmt: skip
    collect(Pipeline.load("shapes", base), cfg, tmp_path / "buf", progress=False)
    pivots = {r["entry_id"]: r["pivot"] for r in read_manifest(tmp_path / "buf").to_pylist()}
    assert len(set(pivots.values())) > 1  # prefixes of different lengths
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--buffer", str(tmp_path / "buf"), "--checkpoint", str(base), "--steps", "2", "--batch-groups",
            "4", "--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "streamalign.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523"]
    two = subprocess.run([*cmd, "-m", "streamalign.cli", *args, "--shard-base", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert "sharded over 2 ranks with FSDP2" in two.stderr
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert all(r["zero_variance_groups"] >= 1 for r in ra)  # some groups skip their replay
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 0.05 * 1e-3, worst  # as the replicated 2-rank run: within 5% of one Adam step (lr 1e-3)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5, abs=1e-9)
    assert [r["zero_variance_groups"] for r in ra] == [r["zero_variance_groups"] for r in rb]


def test_shard_base_is_for_updates_from_a_buffer():
    with pytest.raises(ValueError, match="--shard-base runs the updates of --mode semi only"):
        TrainConfig(mode="on", shard_base=True)
    with pytest.raises(ValueError, match="--shard-base runs the updates of --mode semi only"):
        TrainConfig(buffer="b", shard_base=True, eval_every=2)
