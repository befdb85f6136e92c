"""collect --branch-ranks: a fork group's branches split over ranks give the bytes of one process (the
sampler's share of a group; a 2-rank gloo torchrun against 1 process; clear errors), for the noise fork and
for KV-routed groups."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from streamalign.buffer.manifest import read_manifest
from streamalign.cli import app
from streamalign.models.routed_group import RoutedGroup, routed_group, routing_geometry
from streamalign.models.sampler import Sampler

from .conftest import free_port, make_model, tiny_config
from .test_collect import _cli, shard_sums
from .test_kvpo import ROUTE, _short_long_config

BRANCH = ("branch_noise", "x_t", "x0_old", "branch_latents")
SHARED = ("context", "eps_star", "init_noise", "solver_noise")


@pytest.mark.parametrize("fork", ["initial", "solver"])
def test_shares_on_batch_bounds_concatenate_to_the_whole_groups_bytes(tiny, text, fork):
    _cfg, _model, sampler = tiny
    whole = sampler.fork_group(text, sampler.noise_bank(9), 2, 4, fork=fork, branch_batch=2)
    parts = [sampler.fork_group(text, sampler.noise_bank(9), 2, 4, fork=fork, branch_batch=2, branches=(lo, lo + 2))
             for lo in (0, 2)]  # fmt: skip
    for name in BRANCH:
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name)), name
    for name in SHARED:  # every rank computes the same prefix and noise
        assert all(torch.equal(getattr(p, name), getattr(whole, name)) for p in parts), name


def test_a_share_cut_inside_a_batch_is_the_same_rollout(tiny, text):
    """Batches of 3 cut at the share's bounds (2..3, 3..4): the branches' rollouts to float rounding."""
    _cfg, _model, sampler = tiny
    whole = sampler.fork_group(text, sampler.noise_bank(4), 1, 4, branch_batch=3)
    tail = sampler.fork_group(text, sampler.noise_bank(4), 1, 4, branch_batch=3, branches=(2, 4))
    assert torch.equal(tail.branch_noise, whole.branch_noise[2:])
    assert (tail.branch_latents - whole.branch_latents[2:]).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"branches 3\.\.4 are outside the group of 4"):
        sampler.fork_group(text, sampler.noise_bank(4), 1, 4, branches=(3, 5))


@pytest.mark.slow  # ~30 s (3 processes); the shares it relies on are checked above in-process
def test_two_branch_ranks_write_the_entries_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["collect", "--groups", "3", "-G", "4", "--branch-batch", "2", "--entries-per-shard", "2", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # CPU float results are reproducible per thread count
    assert _cli(*args, "--out", str(one), env=env, stderr=subprocess.DEVNULL).wait() == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    # with --background-scoring: the writer's roll-out of the next shard's first group (a gather) must not
    # run ahead of the team's per-shard decisions (the team agrees on every shard before any roll-out)
    cmd += ["-m", "streamalign.cli", *args, "--branch-ranks", "2", "--background-scoring", "--out", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "this run wrote 2 shards" in r.stdout  # one team: its first rank wrote both (alone: 1 per rank)
    assert shard_sums(one) == shard_sums(two) and len(shard_sums(one)) == 2
    assert read_manifest(one).to_pylist() == read_manifest(two).to_pylist()  # rewards, checksums, ids
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # resume: nothing to do
    assert again.returncode == 0 and "skipped 2 finished" in again.stdout, again.stderr[-2000:]
    assert shard_sums(one) == shard_sums(two) and len(read_manifest(two)) == 12


def test_routed_shares_concatenate_to_the_whole_groups_bytes():
    """--fork kv-routing: rows 0..1 (the anchor and a branch) and 2..3 rolled out apart are the whole group's
    rows byte for byte, the unrouted replays included; every share computes the same prefix and routing."""
    cfg = tiny_config(frames=24, sink=1, window=6)
    sampler = Sampler(make_model(cfg), cfg)
    text = torch.randn(1, 7, cfg.arch.text_dim, generator=torch.Generator().manual_seed(1))
    geo = routing_geometry(cfg, history=12, m_nearest=3, blocks=2, first_chunks=8)
    whole = routed_group(sampler, text, sampler.noise_bank(5), 4, geo)
    parts = [routed_group(sampler, text, sampler.noise_bank(5), 4, geo, rows=(lo, lo + 2)) for lo in (0, 2)]
    for name in RoutedGroup.BRANCH_FIELDS:
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name)), name
    for name in SHARED:
        assert all(torch.equal(getattr(p, name), getattr(whole, name)) for p in parts), name
    assert all(p.routing == whole.routing and p.pivot == whole.pivot for p in parts)
    assert (whole.branch_latents[1] - whole.branch_latents[0]).abs().max() > 1e-3  # the rows do differ
    with pytest.raises(ValueError, match=r"rows 3\.\.4 are outside the group of 4"):
        routed_group(sampler, text, sampler.noise_bank(5), 4, geo, rows=(3, 5))


@pytest.mark.slow  # ~40 s (3 processes on the shapes weights)
def test_two_branch_ranks_write_the_routed_entries_of_one_process(tmp_path):
    """collect --fork kv-routing --branch-ranks 2 (2 gloo ranks, one team) writes the shards and manifest of
    one process."""
    cfg = str(_short_long_config(tmp_path))
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["collect", "--config", cfg, "--fork", "kv-routing", *ROUTE, "--groups", "3", "-G", "4",
            "--entries-per-shard", "2", "--seed", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert _cli(*args, "--out", str(one), env=env, stderr=subprocess.DEVNULL).wait() == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "streamalign.cli", *args, "--branch-ranks", "2", "--out", str(two)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "this run wrote 2 shards" in r.stdout
    assert shard_sums(one) == shard_sums(two) and len(shard_sums(one)) == 2
    assert read_manifest(one).to_pylist() == read_manifest(two).to_pylist()


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["-G", "3", "--branch-ranks", "2"], "--branch-ranks 2 must divide -G 3"),
        (["-G", "4", "--branch-ranks", "2"], "--branch-ranks 2 must divide the 1 ranks of the run"),
    ],
)
def test_bad_branch_ranks_are_one_clear_line(tmp_path, extra, msg):
    r = CliRunner().invoke(app, ["collect", "--out", str(tmp_path / "x"), "--groups", "1", *extra])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "x").exists()
