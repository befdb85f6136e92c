"""Rewards named by a run (rewards/sources.py): reward models from local folders and plug-ins from flags or
the run config, registered lazily (checked before any model loads), recorded in run.yaml and rebuilt from
it by later stages (--rewards-from, train's semi evaluation from its buffer)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.collect.run import CollectRun
from streamalign.rewards import CompositeReward, RewardError
from streamalign.rewards.models import load_reward_model
from streamalign.rewards.models.preprocess import grayscale3
from streamalign.rewards.registry import parse_term
from streamalign.rewards.sources import _LOADED, reward_of
from streamalign.schemas.sections import RewardSection
from streamalign.train.config import TrainConfig
from tests.conftest import free_port
from tests.test_rewards import _tiny_clip

PLUGIN = '''
import torch

def make(path=None, offset=0.0):
    def score(videos, prompts):  # mean brightness (+ offset): [B]
        return videos.float().mean(dim=(1, 2, 3, 4)) + float(offset)
    return score
'''


@pytest.fixture
def plugin(tmp_path) -> Path:
    file = tmp_path / "bright.py"
    file.write_text(PLUGIN)
    return file


def _videos(b=2, f=3, h=30, w=50, seed=0):
    return torch.rand(b, f, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_section_parses_flags_and_makes_paths_absolute(tmp_path, plugin, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = RewardSection(rewards="bright=1", reward_paths="clip=models/clip", reward_options="bright.offset=0.5",
                      reward_plugins="bright=bright.py:make")  # fmt: skip
    assert s.reward_paths == {"clip": str(tmp_path / "models" / "clip")}
    sha = hashlib.sha256(plugin.read_bytes()).hexdigest()  # a file plug-in is recorded with its file's hash
    assert s.reward_plugins == {"bright": f"{plugin}:make#sha256={sha}"}
    assert s.reward_options == {"bright.offset": "0.5"}
    assert RewardSection(reward_plugins="m=my_pkg.mod:make@w").reward_plugins == {"m": f"my_pkg.mod:make@{tmp_path}/w"}
    opts = RewardSection(reward_paths="hpsv3=m", reward_options="hpsv3.config=m/c.yaml,hpsv3.base=q,hpsv3.topk=0.5",
                         reward_plugins="p=my_pkg.mod:make").reward_options  # fmt: skip
    assert opts == {"hpsv3.config": str(tmp_path / "m" / "c.yaml"), "hpsv3.base": str(tmp_path / "q"),
                    "hpsv3.topk": "0.5"}  # a model's base/config paths are recorded absolute, like its folder
    with pytest.raises(ValueError, match=r"--reward-path: 'clip' is not MODEL=DIR"):
        RewardSection(reward_paths="clip")


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"reward_paths": "imagereward=/x"}, r"--reward-path imagereward: unknown reward model; choose videoalign"),
        ({"reward_paths": "clip=/no/such/dir"}, r"--reward-path clip: /no/such/dir does not exist"),
        ({"reward_options": "hpsv3.batch_size=4"}, r"--reward-option hpsv3.batch_size: no reward source 'hpsv3'"),
        ({"reward_options": "x=4"}, r"expected MODEL.KEY=VALUE"),
        ({"reward_plugins": "p=nope_pkg_xyz:make"}, r"cannot import nope_pkg_xyz"),
        ({"reward_plugins": "p=just_a_name"}, r"expected NAME=module:factory"),
        ({"rewards": "not_registered_xyz=1"}, r"unknown reward 'not_registered_xyz'"),
    ],
)
def test_bad_sources_are_one_line_before_any_load(kw, msg):
    with pytest.raises(RewardError, match=msg):
        reward_of(RewardSection(**{"rewards": "sharpness=1", **kw}))


def test_model_rewards_load_lazily_and_match_the_adapter(tmp_path):
    _tiny_clip(tmp_path)
    section = RewardSection(rewards="clip:top50=1,clip:gray=0.5", reward_paths=f"clip={tmp_path}",
                            reward_options="clip.batch_size=3", reward_device="cpu")  # fmt: skip
    _LOADED.clear()
    reward = reward_of(section)
    assert not _LOADED  # registered, nothing loaded yet
    v, prompts = _videos(), ["a red circle", "a blue square"]
    got = reward(v, prompts)
    assert len(_LOADED) == 1  # one model for both terms
    direct = load_reward_model("clip", tmp_path, device="cpu", batch_size=3)
    frames = direct.frame_scores(v, prompts)["score"]
    assert torch.allclose(got["clip:top50"], frames.topk(2, dim=1).values.mean(1), atol=1e-6)
    # the grayscale option of a reward model is the reference's 3-channel grayscale (torchvision weights)
    gray = direct.frame_scores(grayscale3(v).contiguous(), prompts)["score"].mean(1)
    assert torch.allclose(got["clip:gray"], gray, atol=1e-6)
    assert torch.allclose(got["composite"], got["clip:top50"] + 0.5 * got["clip:gray"], atol=1e-6)


def test_dotted_output_names_and_plugin_options(plugin):
    assert parse_term("sharpness")[0].name == "sharpness"
    with pytest.raises(RewardError, match="unknown reward 'nosuchmodel_mq'"):
        parse_term("nosuchmodel.MQ:gray=1")  # the dotted form names the registered nosuchmodel_mq
    reward = reward_of(RewardSection(rewards="bright=1", reward_plugins=f"bright={plugin}:make",
                                     reward_options="bright.offset=0.25"))  # fmt: skip
    v = _videos()
    assert torch.allclose(reward(v, ["a", "b"])["bright"], v.mean(dim=(1, 2, 3, 4)) + 0.25)


def test_collect_records_sources_and_later_stages_rebuild_them(tmp_path, plugin):
    """collect with a plug-in from the CLI; its run.yaml records it (with its file's hash); evaluate
    (--rewards-from) and a semi train config (from its buffer) rebuild the same rewards with --trust-plugins
    (without it they are refused: tests/test_trust.py)."""
    buf = tmp_path / "buf"
    args = ["collect", "--groups", "1", "-G", "2", "--out", str(buf), "--rewards", "sharpness=1,bright=0.5",
            "--reward-plugin", f"bright={plugin}:make", "--reward-option", "bright.offset=0.25"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    run = CollectRun.build(buf / "run.yaml")
    pinned = f"{plugin}:make#sha256={hashlib.sha256(plugin.read_bytes()).hexdigest()}"
    assert run.collect.reward_plugins == {"bright": pinned}
    assert run.collect.reward_options == {"bright.offset": "0.25"}
    from streamalign.buffer.manifest import read_manifest

    assert "reward_bright" in read_manifest(buf).column_names
    ev = CliRunner().invoke(app, ["evaluate", "--out", str(tmp_path / "ev"), "--rewards-from", str(buf),
                                  "--trust-plugins", "--seeds", "1", "--samples", "1",
                                  "--prompts", str(_prompt_file(tmp_path))])  # fmt: skip
    assert ev.exit_code == 0, ev.output
    saved = yaml.safe_load((tmp_path / "ev" / "run.yaml").read_text())["config"]["eval"]
    assert saved["rewards"] == "sharpness=1,bright=0.5" and saved["reward_plugins"] == {"bright": pinned}
    train = TrainConfig(buffer=str(buf), eval_every=1, trust_plugins=True).resolve()
    assert train.rollouts.rewards == "sharpness=1,bright=0.5" and train.rollouts.reward_options == {
        "bright.offset": "0.25"
    }


def _prompt_file(tmp_path: Path) -> Path:
    from streamalign.worlds.shapes import held_out_prompts

    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(p.text for p in held_out_prompts()[:2]))
    return f


def test_unknown_reward_fails_before_the_model_loads(tmp_path, monkeypatch):
    import streamalign.pipeline as pipeline

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the rewards were checked")

    monkeypatch.setattr(pipeline.Pipeline, "load", classmethod(no_load))
    r = CliRunner().invoke(app, ["collect", "--groups", "1", "--out", str(tmp_path / "b"),
                                 "--reward-path", "clip=/no/such/clip"])  # fmt: skip
    assert r.exit_code == 2 and "--reward-path clip: /no/such/clip does not exist" in r.output, r.output


@pytest.mark.slow
def test_torchrun_collect_with_a_plugin_then_train_on_and_evaluate_rebuild_it(tmp_path, plugin):
    """The CLI round trip of issue 18: 2-rank collect with a plug-in reward, then `train --mode on` and
    `evaluate` take the rewards from the buffer's run.yaml."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    buf = tmp_path / "buf"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "streamalign.cli", "collect", "--groups", "2", "-G", "2", "--entries-per-shard", "1",
           "--out", str(buf), "--rewards", "sharpness=1,bright=1",
           "--reward-plugin", f"bright={plugin}:make"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    train = [sys.executable, "-m", "streamalign.cli", "train", "--mode", "on", "--rewards-from", str(buf),
             "--trust-plugins", "--steps", "1", "--batch-groups", "1", "-G", "2", "--lora-rank", "2",
             "--out", str(tmp_path / "on")]  # fmt: skip
    r = subprocess.run(train, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "on" / "run.yaml").read_text())["config"]["rollouts"]
    sha = hashlib.sha256(plugin.read_bytes()).hexdigest()
    assert saved["reward_plugins"] == {"bright": f"{plugin}:make#sha256={sha}"}
    ev = [sys.executable, "-m", "streamalign.cli", "evaluate", "--rewards-from", str(tmp_path / "on"),
          "--trust-plugins", "--seeds", "1", "--samples", "1", "--prompts", str(_prompt_file(tmp_path)),
          "--out", str(tmp_path / "ev")]  # fmt: skip
    r = subprocess.run(ev, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bright" in (tmp_path / "ev" / "report.md").read_text()


def test_composite_parse_is_unchanged_for_plain_names():
    c = CompositeReward.parse("sharpness=1,smoothness:top30=0.5")
    assert c.names == ["sharpness", "smoothness:top30", "composite"]
