"""generate: scene syntax (parsing, errors), hard cuts flush and soft transitions do not, long videos."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.generate.run import generate_video, plan
from streamalign.generate.scenes import Scene, SceneSyntaxError, parse_scenes, scene_chunks
from streamalign.io.media import read_mp4
from streamalign.pipeline import Pipeline

A = "a red circle moving left on a black background"
B = "a blue square moving up on a gray background"
C = "a green triangle moving right on a navy background"


def test_scene_syntax():
    assert parse_scenes("prompt one[5s] | prompt two[10s#] | prompt three") == [
        Scene("prompt one", 5.0),
        Scene("prompt two", 10.0, hard_cut=True),
        Scene("prompt three"),
    ]
    assert parse_scenes(f"  {A}  ") == [Scene(A)]
    assert parse_scenes("x[.5s]|y[2.25s#]") == [Scene("x", 0.5), Scene("y", 2.25, True)]
    for bad, where in [
        ("one[5] | two", "scene 1 'one[5]'"),
        ("one | two[5s]x", "scene 2 'two[5s]x'"),
        ("one[5s] || two", "scene 2 ''"),
        ("one | two[0s]", "> 0 seconds"),
        ("one[2s#] | two", "scene 1"),
        ("one [3s] [4s]", "scene 1"),
    ]:
        with pytest.raises(SceneSyntaxError, match=where.replace("[", r"\[").replace("]", r"\]")):
            parse_scenes(bad)


def test_scene_durations_in_chunks():
    scenes = parse_scenes("a[1.5s] | b | c[0.1s#] | d")
    assert scene_chunks(scenes, 0.75, 4) == [2, 4, 1, 4]  # no total: training length for the free ones
    assert scene_chunks(scenes, 0.75, 4, total_chunks=10) == [2, 4, 1, 3]  # the free ones share 7 chunks
    with pytest.raises(SceneSyntaxError, match="already fill"):
        scene_chunks(scenes, 0.75, 4, total_chunks=3)


@pytest.fixture(scope="module")
def policy():
    return Pipeline.load("shapes")


def test_single_scene_equals_plain_sampling(policy):
    video = generate_video(policy, [(A, 4, False)], seed=5)
    assert torch.equal(video, Pipeline.load("shapes").generate([A], [5])[0])


def test_hard_cut_flushes_and_soft_transition_does_not(policy):
    hard_a = generate_video(policy, [(A, 2, False), (C, 2, True)], seed=3)
    hard_b = generate_video(policy, [(B, 2, False), (C, 2, True)], seed=3)
    assert not torch.equal(hard_a[:6], hard_b[:6])
    assert torch.equal(hard_a[6:], hard_b[6:])  # after '#' nothing before it matters
    soft_a = generate_video(policy, [(A, 2, False), (C, 2, False)], seed=3)
    soft_b = generate_video(policy, [(B, 2, False), (C, 2, False)], seed=3)
    assert (soft_a[6:] - soft_b[6:]).abs().max() > 1e-3  # the soft transition remembers the first scene


def test_long_video_rolls_the_cache(policy):
    long = generate_video(policy, [(A, 10, False)], seed=1)  # 30 frames > 12 trained: rolling window of 12
    assert long.shape == (30, 3, 32, 32) and torch.isfinite(long).all()
    assert torch.equal(long[:12], generate_video(policy, [(A, 4, False)], seed=1))  # same until the window rolls
    (plan_,) = plan([f"{A}[0.375s] | {B}"], policy, fps=16.0, frames=30)
    assert plan_ == [(A, 2, False), (B, 8, False)]


def test_cli_generate_writes_mp4s(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text(f"{A}\n{A}[0.375s] | {C}[0.375s#]\n")
    r = CliRunner().invoke(app, ["generate", "--prompts", str(lines), "--out", str(tmp_path / "g"), "--frames", "15"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "g" / "generate.json").read_text())
    assert [v["frames"] for v in meta["videos"]] == [15, 12]  # given durations win over --frames
    assert read_mp4(tmp_path / "g" / "0000.mp4").shape == (15, 3, 128, 128)
    r = CliRunner().invoke(app, ["generate", "one[5x] | two", "--out", str(tmp_path / "h")])
    assert r.exit_code == 2 and "scene 1" in r.output and len(r.output.strip().splitlines()) == 1
