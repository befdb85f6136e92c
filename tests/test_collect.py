"""collect on the shapes world: deterministic shards, resume without duplicates (also after SIGKILL),
NaN rejection, 2-process torchrun (gloo) equal to 1 process, clear errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from streamalign.buffer.formats import get_format
from streamalign.buffer.inspect import buffer_info
from streamalign.buffer.manifest import read_manifest
from streamalign.cli import app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.io.files import checksum
from streamalign.pipeline import Pipeline
from streamalign.rewards import register_external
from streamalign.worlds.shapes import held_in_prompts

from .conftest import free_port

PROMPTS = tuple(p.text for p in held_in_prompts()[::40])
ARGS = ["--groups", "4", "-G", "3", "--entries-per-shard", "2", "--seed", "7"]


@pytest.fixture(scope="module")
def policy():
    return Pipeline.load("shapes")


def shard_sums(folder: Path) -> dict[str, str]:
    return {p.name: checksum(p) for p in sorted(folder.glob("shard-*"))}


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_collect_writes_deterministic_shards_and_resumes(tmp_path, policy, fmt):
    cfg = CollectConfig(prompts=PROMPTS, groups=3, group_size=3, entries_per_shard=2, seed=1, format=fmt)
    s = collect(policy, cfg, tmp_path / "a", progress=False)
    assert (s.shards_written, s.groups, s.rejected) == (2, 3, 0)
    rows = read_manifest(tmp_path / "a").to_pylist()
    assert len(rows) == 9 and len({r["entry_id"] for r in rows}) == 3
    assert {"reward_colour_match", "reward_shape_fidelity", "composite"} <= set(rows[0])
    entries = [e for p in sorted((tmp_path / "a").glob("shard-*")) for e in get_format(fmt).read(p)]
    assert [e.prompt for e in entries] == [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    assert all(e.group_size == 3 and e.policy_id == policy.policy_id for e in entries)
    again = collect(policy, cfg, tmp_path / "a", progress=False)  # resume: nothing to do, nothing duplicated
    assert (again.shards_written, again.shards_skipped) == (0, 2) and len(read_manifest(tmp_path / "a")) == 9
    collect(policy, cfg, tmp_path / "b", progress=False)
    assert shard_sums(tmp_path / "a") == shard_sums(tmp_path / "b")  # same arguments, same bytes


def test_stored_kv_matches_the_prefix_cache(tmp_path, policy):
    cfg = CollectConfig(prompts=PROMPTS, groups=1, group_size=2, pivot="2", store_kv=True)
    collect(policy, cfg, tmp_path, progress=False)
    (entry,) = get_format("webdataset").read(next(tmp_path.glob("shard-*")))
    tokens = 6 * policy.config.tokens_per_frame
    assert entry.kv["k.0"].shape == (tokens, 4, 32) and len(entry.kv) == 2 * policy.config.arch.num_layers
    assert buffer_info(tmp_path)["bytes"] > 0


def test_nan_rewards_reject_the_group(tmp_path, policy):
    register_external("nan_on_red", f"{Path(__file__).resolve().parent / 'nan_reward.py'}:make")
    cfg = CollectConfig(prompts=PROMPTS, groups=4, group_size=2, rewards="nan_on_red=1,colour_match=1", metrics="")
    s = collect(policy, cfg, tmp_path, progress=False)
    red = sum("red" in PROMPTS[i % len(PROMPTS)] for i in range(4))
    assert red > 0 and s.rejected == red and s.groups == 4 - red
    assert buffer_info(tmp_path)["rejected_groups"] == red
    assert all("red" not in r["prompt"] for r in read_manifest(tmp_path).to_pylist())


def _cli(*args: str, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "streamalign.cli", *args], env=env, **kw)


def test_sigkill_mid_shard_then_resume_equals_uninterrupted(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["collect", *ARGS]
    assert _cli(*args, "--out", str(full), stderr=subprocess.DEVNULL).wait() == 0
    proc = _cli(*args, "--out", str(killed), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(killed.glob("shard-000000*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the first shard is done, the second is being computed
    proc.wait()
    assert len(list(killed.glob("shard-*"))) < 2
    assert _cli(*args, "--out", str(killed), stderr=subprocess.DEVNULL).wait() == 0
    assert shard_sums(killed) == shard_sums(full) and len(shard_sums(full)) == 2
    assert not [p for p in killed.rglob(".*tmp-*")]
    assert sorted(read_manifest(killed).to_pylist(), key=str) == sorted(read_manifest(full).to_pylist(), key=str)


def test_torchrun_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CPU float results are reproducible per thread count
    assert _cli("collect", *ARGS, "--out", str(one), env=env, stderr=subprocess.DEVNULL).wait() == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cmd += ["-m", "streamalign.cli", "collect", *ARGS, "--out", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shard_sums(one) == shard_sums(two)
    assert len(read_manifest(two)) == 12


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["-G", "1"], "--group-size 1 must lie in 2..256"),
        (["--pivot", "9"], "--pivot must be 'uniform' or a chunk index 0..3"),
        (["--format", "hdf5"], "unknown buffer format 'hdf5'"),
        (["--prompts", "/nope.txt"], "prompt file /nope.txt not found"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, extra, msg):
    r = CliRunner().invoke(app, ["collect", "--out", str(tmp_path / "x"), "--groups", "1", *extra])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not list((tmp_path / "x").glob("shard-*")) if (tmp_path / "x").exists() else True


def test_reward_means_in_summary(tmp_path, policy):
    cfg = CollectConfig(prompts=PROMPTS, groups=2, group_size=2)
    collect(policy, cfg, tmp_path, progress=False)
    b = buffer_info(tmp_path)
    assert b["groups"] == 2 and b["branches"] == 4 and 0 < b["reward_means"]["reward_colour_match"] <= 1
    assert torch.isfinite(torch.tensor(list(b["reward_means"].values()))).all()
