"""Objective numerics (issue 19 item 1) against slow, obvious references written here: the k3 approx KL,
|log rho| quantiles and clip fraction of every clipped objective; CoPO's per-step temperature and its exact
categorical KL; the log-ratio bound; --target-kl's early stop in the on-policy loop and its health finding."""

from __future__ import annotations

import json
import math

import pytest
import torch

from streamalign.train.config import TrainConfig
from streamalign.train.health import health
from streamalign.train.loop import train
from streamalign.train.objectives.base import LOG_RATIO_MAX, clipped_surrogate, group_rewards, ratio_stats
from streamalign.train.objectives.copo import adaptive_tau, copo_terms
from tests.test_copo import _setup
from tests.test_train import PROMPTS, base  # noqa: F401  (the module-scoped random-weight base fixture)


def slow_quantile(xs: list[float], p: float) -> float:
    """Linear interpolation between order statistics (position p * (n - 1))."""
    xs = sorted(xs)
    pos = p * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def test_ratio_stats_match_slow_reference():
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.3
    st = ratio_stats(lr, 0.1, clip=True)
    xs = lr.flatten().tolist()
    assert st["approx_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in xs) / len(xs), rel=1e-12)
    assert st["approx_kl"] >= 0
    for p in (50, 90, 99):
        assert st[f"log_ratio_p{p}"] == pytest.approx(slow_quantile([abs(x) for x in xs], p / 100), rel=1e-12)
    assert st["clip_frac"] == pytest.approx(sum(abs(math.exp(x) - 1) > 0.1 for x in xs) / len(xs))
    assert st["ratio_dev_max"] == pytest.approx(max(abs(math.exp(x) - 1) for x in xs), rel=1e-12)
    assert ratio_stats(lr, 0.1, clip=False)["clip_frac"] == 0.0
    assert ratio_stats(torch.zeros(4), 0.1, True)["approx_kl"] == 0.0  # policy = old: no KL, no clipping


def test_log_ratio_bound_keeps_the_loss_finite_and_cuts_the_gradient():
    lr = torch.tensor([500.0, -500.0, 0.5, 30.0], requires_grad=True)
    adv = torch.tensor([0.0, 1.0, -1.0, -2.0])  # A = 0 on an overflowing ratio: inf * 0 without the bound
    loss, st = clipped_surrogate(lr, adv, 0.2, clip=True)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and math.isfinite(st["approx_kl"])
    assert st["ratio_dev_max"] == pytest.approx(math.expm1(LOG_RATIO_MAX), rel=1e-6)
    assert lr.grad[0] == 0 and lr.grad[1] == 0 and lr.grad[3] == 0  # beyond +-20: no gradient
    # inside the bound and unclipped (A < 0, rho > 1 + eps: min picks A rho): d/dlr of -A rho / n
    assert float(lr.grad[2]) == pytest.approx(1.0 * math.exp(0.5) / 4, rel=1e-6)


def test_adaptive_tau_per_step_is_each_steps_median_off_anchor_distance():
    _, x0_old, anchors, _ = _setup(s=3)
    x0_old[:, 1] *= 10  # steps with very different spreads (as along a real trajectory)
    x0_old[:, 2] *= 0.05
    g, s = x0_old.shape[:2]
    d_old = torch.stack([torch.stack([((x0_old[i] - x0_old[k]) ** 2).flatten(1).mean(1) for i in range(g)], -1)
                         for k in anchors.tolist()])  # [K, S, G]  # fmt: skip
    tau = adaptive_tau(d_old.float(), anchors, 2.0, "step")
    assert tau.shape == (1, s, 1)
    for step in range(s):
        vals = sorted(float(d_old[j, step, i]) for j, k in enumerate(anchors.tolist()) for i in range(g) if i != k)
        assert float(tau[0, step, 0]) == pytest.approx(2.0 * vals[(len(vals) - 1) // 2], rel=1e-5)
    pooled = adaptive_tau(d_old.float(), anchors, 1.0, "pooled")
    assert pooled.dim() == 0 and float(tau.max() / tau.min()) > 100  # the spread one pooled median ignores


def slow_copo_step_tau(a, x0_old, anchors, adv, taus, eps):
    """Loops: the clipped CoPO loss with temperature taus[s] at step s, and the mean categorical KL."""
    k_n, s_n, g_n = a.shape[0], a.shape[1], x0_old.shape[0]
    total, kl, count = 0.0, 0.0, 0
    for k in range(k_n):
        for s in range(s_n):
            d = [float(((x0_old[i, s] - a[k, s]) ** 2).mean()) / taus[s] for i in range(g_n)]
            d_old = [float(((x0_old[i, s] - x0_old[anchors[k], s]) ** 2).mean()) / taus[s] for i in range(g_n)]
            z, z_old = sum(math.exp(-x) for x in d), sum(math.exp(-x) for x in d_old)
            p = [math.exp(-x) / z for x in d]
            q = [math.exp(-x) / z_old for x in d_old]
            kl += sum(q[i] * math.log(q[i] / p[i]) for i in range(g_n))
            for i in range(g_n):
                rho = p[i] / q[i]
                total += min(adv[i] * rho, adv[i] * min(max(rho, 1 - eps), 1 + eps))
                count += 1
    return -total / count, kl / (k_n * s_n)


def test_copo_per_step_tau_matches_slow_reference():
    a, x0_old, anchors, adv = _setup(s=3)
    x0_old[:, 0] *= 4
    a[:, 0] *= 4
    loss, st = copo_terms(a.float(), x0_old.float(), anchors, adv, eps=0.2, tau_mode="step")
    d_old = torch.stack([torch.stack([((x0_old[i] - x0_old[k]) ** 2).flatten(1).mean(1) for i in range(6)], -1)
                         for k in anchors.tolist()])  # fmt: skip
    taus = [float(t) for t in adaptive_tau(d_old.float(), anchors, 1.0, "step").flatten()]
    ref, kl = slow_copo_step_tau(a, x0_old, anchors.tolist(), adv.tolist(), taus, 0.2)
    assert abs(float(loss) - ref) < 1e-5 * max(1.0, abs(ref))
    assert st["categorical_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-9) and kl > 0
    assert st["tau"] == pytest.approx(sum(taus) / 3, rel=1e-5)
    assert st["tau_spread"] == pytest.approx(max(taus) / min(taus), rel=1e-5) and st["tau_spread"] > 1
    assert 0.5 < st["d_over_tau"] < 2.0
    assert st["approx_kl"] > 0 and 0 <= st["clip_frac"] <= 1
    _, same = copo_terms(x0_old[anchors].float(), x0_old.float(), anchors, adv, tau_mode="step")
    assert same["approx_kl"] == 0 and same["categorical_kl"] == pytest.approx(0, abs=1e-12)


def test_advantage_std_and_zero_variance():
    class E:
        def __init__(self, r):
            self.rewards, self.reward_weights = {"r": torch.tensor(r)}, {"r": 1.0}

    _, info = group_rewards(E([0.1, 0.5, 0.9, 0.3]))
    assert info["adv_std"] == pytest.approx(1.0, rel=1e-4) and info["zero_variance"] == 0.0
    _, info = group_rewards(E([0.4, 0.4, 0.4]))
    assert info["adv_std"] == 0.0 and info["zero_variance"] == 1.0


def test_target_kl_is_on_policy_only_and_positive():
    with pytest.raises(ValueError, match="--target-kl stops an on-policy iteration"):
        TrainConfig(mode="semi", buffer="buf", objective="copo", target_kl=0.01)
    with pytest.raises(ValueError, match=r"--target-kl -1\.0 must be > 0"):
        TrainConfig(mode="on", objective="copo", target_kl=-1.0)
    with pytest.raises(ValueError, match="tau_mode"):
        TrainConfig(mode="on", objective="copo", tau_mode="nope")


def test_target_kl_stops_the_rest_of_an_iteration(tmp_path, base):  # noqa: F811
    """A tiny target: every iteration's second update (the first whose policy moved) measures a KL above
    it, is not applied, and the third is skipped; the step counter keeps iteration x K."""
    cfg = TrainConfig(mode="on", checkpoint=str(base), prompts=PROMPTS, steps=2, batch_groups=2, group_size=3,
                      updates_per_iter=3, lr=1e-4, lora_rank=4, lora_alpha=8, save_every=1, threads=1,
                      objective="copo", target_kl=1e-12)  # fmt: skip
    s = train(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert s.steps == 6 and [r["step"] for r in rows] == [1, 3, 4, 6]
    assert [r.get("kl_stop", 0) for r in rows] == [0, 1, 0, 1]
    assert all("lr" not in r and r["approx_kl"] > 1e-12 for r in rows if r.get("kl_stop"))
    assert rows[0]["approx_kl"] == 0 and "lr" in rows[0]
    for r in rows:  # every new statistic is logged and sane
        assert 0 <= r["zero_variance_share"] <= 1 and r["adv_std"] >= 0 and r["log_ratio_p99"] >= r["log_ratio_p50"]
    h = json.loads((tmp_path / "summary.json").read_text())["health"]
    assert h["kl_stops"] == 2 and h["iterations"] == 2
    assert any("--target-kl 1e-12 stopped 2 iterations early" in w["what"] for w in h["warnings"])


def test_health_warns_on_kl_and_log_ratios_near_the_bound():
    rows = [{"step": i, "loss": 0.0, "reward": 0.5, "ratio_dev_max": 0.0 if i % 2 else 5.0,
             "approx_kl": 0.0 if i % 2 else 3.0, "log_ratio_p99": 0.0 if i % 2 else 15.0, "clip_frac": 0.1}
            for i in range(1, 21)]  # fmt: skip
    h = health(rows, {"optim": {"lr": 1e-4}, "objective": {"name": "copo"}})
    assert h["approx_kl"]["median"] == 3.0  # over the updates that moved (not the on-policy first ones)
    text = " ".join(w["what"] + " " + w["cause"] for w in h["warnings"])
    assert "approx KL 3 per update (median, k3 estimator) above 0.1" in text
    assert "|log ratio| 99th percentile 15" in text and "numerical bound ±20" in text
    calm = [{**r, "approx_kl": 0.0 if r["step"] % 2 else 0.01, "log_ratio_p99": 0.1} for r in rows]
    assert health(calm, {"optim": {"lr": 1e-4}, "objective": {"name": "copo"}})["warnings"] == []


def test_copo_defaults_are_the_swept_ones():
    """The defaults `experiment sweep` chose (README): per-step tau x 10, clip eps 0.2; SDE-GRPO keeps 1e-4."""
    o = TrainConfig(mode="on").objective.build()
    assert (o.tau_mode, o.tau_scale, o.eps, o.tau, o.target_kl) == ("step", 10.0, 0.2, None, None)
    assert TrainConfig(mode="on", objective="sde-grpo").objective.build().eps == 1e-4
