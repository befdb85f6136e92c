"""Evidence that training aligns: short semi-on-policy and on-policy runs on the shapes world raise the
composite reward of their training prompts on fresh seeds (paired with the base model: same noise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamalign.collect.collector import CollectConfig, collect
from streamalign.pipeline import Pipeline
from streamalign.rewards import CompositeReward
from streamalign.scoring import paired_differences, score_policy
from streamalign.train.config import TrainConfig
from streamalign.train.loop import train
from streamalign.worlds.shapes import held_in_prompts
from streamalign.worlds.shapes.rewards import SHAPES_METRICS, SHAPES_REWARDS

PROMPTS = tuple(p.text for p in held_in_prompts()[::31][:8])  # every colour, shape, direction, background
FRESH = [p for p in PROMPTS for _ in range(16)], [5_000_000 + i for i in range(8 * 16)]  # unseen seeds


def gain(adapter: Path) -> dict[str, dict[str, float]]:
    reward = CompositeReward.parse(SHAPES_REWARDS, SHAPES_METRICS)
    base = score_policy(Pipeline.load("shapes"), *FRESH, reward)
    return paired_differences(base, score_policy(Pipeline.load("shapes", lora=adapter), *FRESH, reward))


@pytest.mark.slow  # ~2 min; the default run's evidence of alignment is the demo's (test_merge_evaluate.py)
def test_semi_on_policy_run_raises_the_composite(tmp_path):
    """64 groups of G=8 from the shipped model, then 40 CoPO updates of 8 groups (the demo's lr 3e-5): ~1 min."""
    collect(Pipeline.load("shapes"), CollectConfig(prompts=PROMPTS, groups=64, group_size=8, seed=1), tmp_path / "buf",
            progress=False)  # fmt: skip
    cfg = TrainConfig(mode="semi", buffer=str(tmp_path / "buf"), steps=40, batch_groups=8, lr=3e-5)
    train(cfg, tmp_path / "semi", progress=False)
    g = gain(tmp_path / "semi" / "adapter")["composite"]
    assert g["ci_low"] > 0 and g["diff"] > 0.15, g


@pytest.mark.slow
def test_on_policy_run_raises_the_composite(tmp_path):
    """15 iterations of 8 fresh groups of G=8, 2 updates each (the demo's lr 3e-5): ~1.5 min."""
    cfg = TrainConfig(mode="on", prompts=PROMPTS, steps=15, batch_groups=8, group_size=8, lr=3e-5)
    train(cfg, tmp_path / "on", progress=False)
    g = gain(tmp_path / "on" / "adapter")["composite"]
    assert g["ci_low"] > 0 and g["diff"] > 0.15, g
