"""KVPO: KV-routing branch selection, routed fork groups, routed buffer entries and the kvpo objective."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from streamalign.models.kv_cache import KVCache
from streamalign.models.kv_routing import RoutingGeometry, RoutingPlan, eligible_starts, plan_routing
from streamalign.models.noise import derive_seed
from streamalign.models.routed_group import routed_group, routing_geometry
from streamalign.models.sampler import Sampler
from streamalign.schemas.buffer import Entry, SchemaError
from streamalign.train.objectives.base import GroupInput
from streamalign.train.objectives.kvpo import KVPO, kvpo_loss, tve_scores
from streamalign.train.replay import PivotReplay

from .conftest import make_model, tiny_config


# -- selection -----------------------------------------------------------------------------------------
def slow_routing(n, c, sink, window, history, m, blocks, first, k, seed, start=None):
    """The selection written out: simulate the ring to find which frames stay resident, then the repo's
    dispersed draw from one permutation of the pool."""
    ring = window + history
    eligible = []
    for p in range(first):
        if p >= n or p * c < sink + window or p + blocks > n:
            continue
        resident = []  # non-sink frames in the ring after writing chunk j, oldest first
        for j in range(p + blocks):
            for f in range(j * c, (j + 1) * c):
                if f >= sink:
                    resident.append(f)
                    if len(resident) > ring:
                        resident.pop(0)
        pool = [f for f in resident if f < p * c - m]  # resident once the last routed chunk is written
        if len(pool) >= window - m:
            eligible.append((p, pool))
    if start is None:
        g = torch.Generator().manual_seed(derive_seed(seed, 7, 0))
        p, pool = eligible[int(torch.randint(len(eligible), (1,), generator=g))]
    else:
        p, pool = next(e for e in eligible if e[0] == start)
    need = window - m
    older = []
    g = torch.Generator().manual_seed(derive_seed(seed, 7, 1))
    perm = torch.randperm(len(pool), generator=g).tolist() if need else []
    for b in range(k):
        picks = []
        for i in range(need):
            picks.append(pool[perm[(b * max(1, len(pool) // k) + i) % len(pool)]])
        older.append(sorted(picks))
    return p, older


@pytest.mark.parametrize(
    "n,c,sink,window,history,m,blocks,first,k,seed",
    [(16, 3, 0, 12, 21, 4, 5, 7, 8, 0), (16, 3, 0, 12, 21, 4, 5, 7, 3, 11), (30, 3, 3, 9, 21, 4, 5, 7, 8, 5),
     (12, 2, 1, 6, 4, 3, 2, 12, 5, 9), (20, 3, 0, 12, 30, 6, 3, 20, 6, 2)],
)  # fmt: skip
def test_selection_equals_slow_reference(n, c, sink, window, history, m, blocks, first, k, seed):
    geo = RoutingGeometry(n, c, sink, window, history, m, blocks, first)
    plan = plan_routing(geo, k, seed)
    p, older = slow_routing(n, c, sink, window, history, m, blocks, first, k, seed)
    assert plan.start == p and [list(o) for o in plan.older] == older
    # the frames a routed chunk attends to: sink + the branch's older frames + the m newest; the window budget
    for b in range(k):
        for j in range(p, p + blocks):
            want = sorted({*range(sink), *older[b], *range((j + 1) * c - m, (j + 1) * c)})
            assert plan.attended(b, j) == want and len(want) == sink + window
        assert plan.attended(b, p - 1) is None and plan.attended(b, p + blocks) is None
    assert RoutingPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    for e in eligible_starts(geo):  # a fixed start gives the same frames as the slow reference
        assert list(plan_routing(geo, k, seed, e.chunk).older) == [
            tuple(o) for o in slow_routing(n, c, sink, window, history, m, blocks, first, k, seed, e.chunk)[1]
        ]


def test_selection_refuses_impossible_geometry():
    with pytest.raises(ValueError, match="no chunk can start"):
        plan_routing(RoutingGeometry(6, 3, 0, 12, 21), 4, 0)
    with pytest.raises(ValueError, match="m-nearest"):
        plan_routing(RoutingGeometry(16, 3, 0, 12, 21, m_nearest=2), 4, 0)
    with pytest.raises(ValueError, match="cannot start"):
        plan_routing(RoutingGeometry(16, 3, 0, 12, 21), 4, 0, start=1)


# -- routed groups -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routed():
    cfg = tiny_config(frames=24, sink=1, window=6)
    sampler = Sampler(make_model(cfg), cfg)
    text = torch.randn(1, 7, cfg.arch.text_dim, generator=torch.Generator().manual_seed(1))
    return cfg, sampler, text


def test_zero_randomness_every_branch_equals_the_anchor(routed):
    _cfg, sampler, text = routed
    geo = routing_geometry(sampler.config, history=6, m_nearest=6, blocks=2, first_chunks=8)  # budget == nearest
    grp = routed_group(sampler, text, sampler.noise_bank(5), 3, geo)
    plain = sampler.rollout(text, sampler.noise_bank(5))[0]
    for row in grp.videos():
        assert (row - plain).abs().max().item() < 1e-5
    assert all(len(o) == 0 for o in grp.routing["older"])


def test_routed_branches_differ_and_store_unrouted_predictions(routed):
    _cfg, sampler, text = routed
    geo = routing_geometry(sampler.config, history=12, m_nearest=3, blocks=2, first_chunks=8)
    grp = routed_group(sampler, text, sampler.noise_bank(5), 4, geo)
    plain = sampler.rollout(text, sampler.noise_bank(5))[0]
    v = grp.videos()
    p, c = grp.pivot, sampler.chunk_frames
    assert (v[0] - plain).abs().max().item() < 1e-5  # the anchor is the usual rollout
    assert torch.equal(v[1:, : p * c], v[:1, : p * c].expand(3, -1, -1, -1, -1))  # the shared prefix
    assert min((v[i] - v[0]).abs().max().item() for i in (1, 2, 3)) > 1e-3  # routing changes the branches
    assert torch.equal(grp.x_t[:, 0], grp.x_t[:1, 0].expand(4, -1, -1, -1, -1))  # one initial noise
    # the unrouted predictions are the anchor's own predictions on its row, and differ on the branches
    assert (grp.x0_unrouted[0] - grp.x0_old[0]).abs().max().item() < 1e-5
    assert (grp.x0_unrouted[1] - grp.x0_old[1]).abs().max().item() > 1e-3
    # routed rows replay exactly: the same seed gives the same bytes
    again = routed_group(sampler, text, sampler.noise_bank(5), 4, geo)
    assert torch.equal(again.branch_latents, grp.branch_latents) and again.routing == grp.routing


def test_routed_rows_equal_rollouts_through_a_global_cache_told_every_frame():
    """LongLive's geometry (sink 3, window 9) and the repo's defaults (m 4, 5 blocks, history 21): each row
    equals a rollout through a global cache (every frame kept) whose routes name, chunk by chunk, the frames
    the reference rule says it reads: the rolling ring with history keeps exactly the frames routing needs."""
    cfg = tiny_config(frames=27, sink=3, window=9)
    sampler = Sampler(make_model(cfg, seed=2), cfg)
    text = torch.randn(1, 7, cfg.arch.text_dim, generator=torch.Generator().manual_seed(4))
    geo = routing_geometry(sampler.config, history=21, m_nearest=4, blocks=5, first_chunks=7)
    grp = routed_group(sampler, text, sampler.noise_bank(8), 3, geo)
    plan = RoutingPlan.from_json(grp.routing)
    n, c = cfg.num_chunks, sampler.chunk_frames
    for row in range(3):
        cache = KVCache.for_model(sampler.model, 1, cfg.tokens_per_frame, max_frames=n * c)
        for j in range(n):
            e = (j + 1) * c
            routed = plan.attended(row - 1, j) if row else None
            cache.routes[j * c] = routed or [*range(3), *range(max(3, e - 9), e)]
        solo = sampler.rollout(text, sampler.noise_bank(8), cache=cache)[0]
        assert (grp.videos()[row] - solo).abs().max().item() < 1e-5, row


def _entry(grp, sampler, rewards: dict[str, list[float]], weights=None) -> Entry:
    return Entry.from_fork_group(
        grp, entry_id="e0", run_id="r", policy_id="p", prompt="x", prompt_id="x", config_name="tiny", arch_id="a",
        timesteps=list(sampler.schedule.timesteps), rewards={k: torch.tensor(v) for k, v in rewards.items()},
        reward_weights=weights or {"a": 1.0},
    ).validate()  # fmt: skip


def test_routed_entry_round_trips_and_plain_entries_keep_their_record(routed):
    _cfg, sampler, text = routed
    geo = routing_geometry(sampler.config, history=12, m_nearest=3, blocks=2, first_chunks=8)
    grp = routed_group(sampler, text, sampler.noise_bank(5), 3, geo)
    e = _entry(grp, sampler, {"a": [0.1, 0.2, 0.3]})
    meta, tensors = e.to_record()
    back = Entry.from_record(json.loads(json.dumps(meta)), tensors)
    assert back.routing == grp.routing and torch.equal(back.x0_unrouted, grp.x0_unrouted)
    plain = sampler.fork_group(text, sampler.noise_bank(5), 2, 3)
    pm, pt = _entry(plain, sampler, {"a": [0.1, 0.2, 0.3]}).to_record()
    assert "routing" not in pm and "x0_unrouted" not in pt
    assert Entry.from_record(pm, pt).routing is None
    with pytest.raises(SchemaError, match="both routing and x0_unrouted"):
        Entry.from_record(meta, {k: v for k, v in tensors.items() if k != "x0_unrouted"})


# -- the objective -------------------------------------------------------------------------------------
def test_tve_scores_and_loss_equal_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    sigmas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    score = tve_scores(target, pred, sigmas, floor=0.6)
    for k in range(3):  # sum over steps of -mean sq error / (2 max(sigma, floor)^2)
        want = sum(-sum((target[k, s, i] - pred[k, s, i]).item() ** 2 for i in range(4)) / 4
                   / (2 * max(sigmas[s].item(), 0.6) ** 2) for s in range(2))  # fmt: skip
        assert math.isclose(score[k].item(), want, rel_tol=1e-6)
    s_new, s_old = [-1.0, -2.0, -0.5], [-1.2, -1.9, -0.8]
    adv = [1.5, -0.5, 0.25]
    for safe in (True, False):
        loss, stats = kvpo_loss(torch.tensor(s_new), torch.tensor(s_old), torch.tensor(adv), safe, 0.1, 0.2, 0.3)
        z_new, z_old = sum(math.exp(x) for x in s_new), sum(math.exp(x) for x in s_old)
        terms, kl = [], 0.0
        for i in range(3):
            p_new, p_old = math.exp(s_new[i]) / z_new, math.exp(s_old[i]) / z_old
            rho = p_new / p_old
            terms.append(min(rho * adv[i], min(max(rho, 0.9), 1.2) * adv[i]))
            kl += p_new * math.log(p_new / p_old)
        # the anchor slot: softmax over [log pi(1..K), 0] when no branch beats the anchor (the pis sum to 1)
        pi_anchor = 0.0 if safe else 1.0 / (1.0 + 1.0)
        want = (1 - pi_anchor) * (-sum(terms) / 3 + 0.3 * kl)
        assert math.isclose(loss.item(), want, rel_tol=1e-5), (safe, loss.item(), want)
        assert math.isclose(stats["pi_anchor"], pi_anchor, abs_tol=1e-7)


def test_advantages_equal_a_hand_computation(routed):
    _cfg, sampler, text = routed
    geo = routing_geometry(sampler.config, history=12, m_nearest=3, blocks=2, first_chunks=8)
    grp = routed_group(sampler, text, sampler.noise_bank(5), 4, geo)
    r_g, r_l = [0.5, 0.2, 0.9, 0.4], [0.3, 0.1, 0.2, 0.25]  # row 0 the anchor; no branch beats it locally
    e = _entry(grp, sampler, {"a": r_g, "local.a": r_l}, {"a": 2.0})

    def anchor_adv(r):
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # sample std over branches + anchor
        return [2.0 * (x - r[0]) / (std + 1e-8) for x in r[1:]]

    def std_norm(a):
        mean = sum(a) / 3
        return [x / (math.sqrt(sum((y - mean) ** 2 for y in a) / 3) + 1e-8) for x in a]

    want = [0.5 * g + 1.0 * lo for g, lo in zip(std_norm(anchor_adv(r_g)), std_norm(anchor_adv(r_l)), strict=True)]
    adv, safe = KVPO(adv_clip=0).advantages(e)
    assert safe and torch.allclose(adv.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    clipped, _ = KVPO(adv_clip=0.7).advantages(e)
    assert torch.allclose(clipped.double(), torch.tensor(want, dtype=torch.float64).clamp(-0.7, 0.7), atol=1e-6)
    unsafe = _entry(grp, sampler, {"a": [0.9, 0.2, 0.3, 0.4]})
    assert not KVPO().advantages(unsafe)[1]


def test_group_loss_old_policy_is_the_rollout_policy_and_gradients_flow(routed):
    _cfg, sampler, text = routed
    geo = routing_geometry(sampler.config, history=12, m_nearest=3, blocks=2, first_chunks=8)
    grp = routed_group(sampler, text, sampler.noise_bank(5), 4, geo)
    e = _entry(grp, sampler, {"a": [0.5, 0.2, 0.9, 0.4]})
    params = [p for p in sampler.model.parameters()]
    for p in params:
        p.requires_grad_(True)
    try:
        out = KVPO().group_loss(GroupInput(e, text, torch.Generator()), PivotReplay(sampler))
        assert out.stats["ratio_dev_max"] < 1e-4  # rho = 1: the stored unrouted predictions are pi_old's
        out.loss.backward()
        assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    with pytest.raises(ValueError, match="KV-routed groups"):
        plain = sampler.fork_group(text, sampler.noise_bank(5), 2, 3)
        KVPO().group_loss(GroupInput(_entry(plain, sampler, {"a": [0.1, 0.2, 0.3]}), text, torch.Generator()),
                          PivotReplay(sampler))  # fmt: skip


# -- the command line ----------------------------------------------------------------------------------
def _short_long_config(tmp_path: Path) -> Path:
    """shapes-long cut to 8 chunks (the shipped weights), so a routed collect takes seconds."""
    from streamalign.schemas.config import PRESET_DIR

    data = yaml.safe_load((PRESET_DIR / "shapes-long.yaml").read_text())
    data["latent"]["frames"] = 24
    data["checkpoint"] = str((PRESET_DIR / data["checkpoint"]).resolve())
    path = tmp_path / "shapes-short-long.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


ROUTE = ["--kv-history", "12", "--m-nearest", "6", "--perturb-blocks", "2", "--perturb-first", "8"]
TRAIN = ["--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]


def _cli(*args, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, *launcher, "-m", "streamalign.cli", *args], env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def kv_buffer(tmp_path_factory):
    """(config path, a 4-group KV-routed buffer) on shapes-long cut to 8 chunks."""
    tmp = tmp_path_factory.mktemp("kv")
    cfg = str(_short_long_config(tmp))
    _cli("collect", "--config", cfg, "--fork", "kv-routing", *ROUTE, "--groups", "4", "-G", "4", "--seed", "3",
         "--entries-per-shard", "2", "--out", str(tmp / "buf"))  # fmt: skip
    return cfg, tmp / "buf"


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_collect_kv_routing_then_train_kvpo_semi_and_on(tmp_path, kv_buffer):
    cfg, buf = kv_buffer
    _cli("train", "--config", cfg, "--objective", "kvpo", "--buffer", str(buf), "--steps", "2",
         "--batch-groups", "2", *TRAIN, "--out", str(tmp_path / "semi"))  # fmt: skip
    rows = _rows(tmp_path / "semi")
    assert rows[0]["ratio_dev_max"] < 1e-4 and all(math.isfinite(r["loss"]) for r in rows)
    _cli("train", "--config", cfg, "--mode", "on", "--objective", "kvpo", "-G", "3", "--steps", "1",
         "--updates-per-iter", "1", "--batch-groups", "1", *TRAIN, *ROUTE, "--out", str(tmp_path / "on"))  # fmt: skip
    rows = _rows(tmp_path / "on")
    assert rows and rows[0]["ratio_dev_max"] < 1e-4


@pytest.mark.slow
def test_kvpo_two_ranks_equal_one(tmp_path, kv_buffer):
    cfg, buf = kv_buffer
    args = ["train", "--config", cfg, "--objective", "kvpo", "--buffer", str(buf), "--steps", "2",
            "--batch-groups", "4", *TRAIN]  # fmt: skip
    _cli(*args, "--out", str(tmp_path / "one"))
    _cli(*args, "--out", str(tmp_path / "two"),
         launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"))  # fmt: skip
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 0.05 * 1e-3, worst  # within 5% of one Adam step, as for the other objectives (test_train)
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert ra[0]["loss"] == pytest.approx(rb[0]["loss"], rel=1e-5, abs=1e-9)


def test_routing_settings_count_only_for_kv_routed_collections():
    from streamalign.collect.collector import CollectConfig
    from streamalign.schemas.config import ModelConfig

    model = ModelConfig.load("tiny")
    plain, other = CollectConfig(prompts=("a",)), CollectConfig(prompts=("a",), kv_history=5, m_nearest=6)
    assert plain.run_id == other.run_id and "--kv-history" not in plain.settings(model)  # older buffers unchanged
    routed = CollectConfig(prompts=("a",), fork="kv-routing")
    assert routed.settings(model)["--kv-history"] == 21 and routed.run_id != plain.run_id
    assert CollectConfig(prompts=("a",), fork="kv-routing", kv_history=5).run_id != routed.run_id


@pytest.mark.parametrize(
    ("extra", "msg"),
    [([], "needs a rolling KV cache"), (["--config", "shapes-long", "--perturb-blocks", "16"], "no chunk can start"),
     (["--config", "shapes-long", "--pivot", "1"], "--pivot 1 cannot start")],
)  # fmt: skip
def test_collect_kv_routing_refuses_bad_geometry_in_one_line(tmp_path, extra, msg):
    from typer.testing import CliRunner

    from streamalign.cli import app

    r = CliRunner().invoke(app, ["collect", "--out", str(tmp_path / "x"), "--groups", "1", "--fork", "kv-routing",
                                 *extra])  # fmt: skip
    assert r.exit_code == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()
