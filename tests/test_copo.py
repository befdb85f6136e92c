"""CoPO equations against a slow, obvious implementation, and the properties the objective promises."""

from __future__ import annotations

import math

import pytest
import torch

from streamalign.adapters.lora import LoraSettings, attach_lora
from streamalign.collect.collector import prefix_kv
from streamalign.models.sampler import Sampler
from streamalign.schemas.buffer import Entry
from streamalign.train.objectives.base import group_advantages
from streamalign.train.objectives.copo import adaptive_tau, copo_terms
from streamalign.train.replay import PivotReplay
from tests.conftest import make_model, tiny_config


def slow_copo(a, x0_old, anchors, adv, tau, eps, clip=True):
    """Loops and scalar maths: -mean over (anchor, step, branch) of min(A rho, A clip(rho))."""
    k_n, s_n = a.shape[:2]
    g_n = x0_old.shape[0]
    total, count = 0.0, 0
    for k in range(k_n):
        for s in range(s_n):
            d = [float(((x0_old[i, s] - a[k, s]) ** 2).mean()) for i in range(g_n)]
            d_old = [float(((x0_old[i, s] - x0_old[anchors[k], s]) ** 2).mean()) for i in range(g_n)]
            z = sum(math.exp(-x / tau) for x in d)
            z_old = sum(math.exp(-x / tau) for x in d_old)
            for i in range(g_n):
                rho = (math.exp(-d[i] / tau) / z) / (math.exp(-d_old[i] / tau) / z_old)
                term = adv[i] * rho
                if clip:
                    term = min(term, adv[i] * min(max(rho, 1 - eps), 1 + eps))
                total += term
                count += 1
    return -total / count


def _setup(seed=0, g=6, k=3, s=2, d=(3, 4, 2, 2)):
    gen = torch.Generator().manual_seed(seed)
    x0_old = torch.randn(g, s, *d, generator=gen, dtype=torch.float64)
    anchors = torch.tensor([0, 2, 5][:k])
    a = x0_old[anchors] + 0.3 * torch.randn(k, s, *d, generator=gen, dtype=torch.float64)
    adv = group_advantages(torch.randn(g, generator=gen))
    return a, x0_old, anchors, adv


@pytest.mark.parametrize("clip", [True, False])
def test_copo_matches_slow_reference(clip):
    a, x0_old, anchors, adv = _setup()
    for eps in (1e-4, 0.2):
        loss, _ = copo_terms(a.float(), x0_old.float(), anchors, adv, tau=1.7, eps=eps, clip=clip)
        ref = slow_copo(a, x0_old, anchors.tolist(), adv.tolist(), 1.7, eps, clip)
        assert abs(float(loss) - ref) < 1e-5 * max(1.0, abs(ref))


def test_adaptive_tau_is_the_median_off_anchor_distance():
    _, x0_old, anchors, _ = _setup()
    d_old = ((x0_old[anchors].unsqueeze(2) - x0_old.transpose(0, 1).unsqueeze(0)) ** 2).flatten(3).mean(-1)
    vals = [float(d_old[k, s, i]) for k in range(3) for s in range(2) for i in range(6) if i != anchors[k]]
    assert float(adaptive_tau(d_old.float(), anchors)) == pytest.approx(sorted(vals)[(len(vals) - 1) // 2], rel=1e-5)
    _, stats = copo_terms(x0_old[anchors].float(), x0_old.float(), anchors, torch.zeros(6))
    assert 0.5 < stats["d_over_tau"] < 2.0  # O(1) by construction


def test_gradient_moves_anchor_toward_positive_and_away_from_negative():
    _, x0_old, anchors, _ = _setup()
    adv = torch.tensor([0.0, 2.0, 0.0, 0.0, -2.0, 0.0])  # branch 1 good, branch 4 bad
    a = x0_old[anchors].float().clone().requires_grad_(True)  # rho = 1: on-policy, inside the clip
    loss, _ = copo_terms(a, x0_old.float(), anchors, adv, eps=1e-4)
    loss.backward()
    stepped = a.detach() - 1e-2 * a.grad
    dist = lambda x, i: ((x0_old[i].float() - x) ** 2).mean(tuple(range(1, x.dim())))  # noqa: E731
    assert (dist(stepped, 1) < dist(a.detach(), 1)).all()
    assert (dist(stepped, 4) > dist(a.detach(), 4)).all()


def test_zero_advantages_give_zero_gradient():
    a, x0_old, anchors, _ = _setup()
    a = a.float().requires_grad_(True)
    copo_terms(a, x0_old.float(), anchors, torch.zeros(6))[0].backward()
    assert a.grad.abs().max() == 0


def test_clip_bounds_the_update():
    """Once the ratios left [1 - eps, 1 + eps] in the advantage's favour, the clipped loss has no gradient
    (the update stops); without the clip it keeps pushing."""
    _, x0_old, anchors, _ = _setup(k=1)
    adv = torch.tensor([0.0, 1.5, 0.0, 0.0, 0.0, 0.0])
    a = (x0_old[anchors] + 0.05 * (x0_old[1] - x0_old[anchors])).float()  # moved toward the good branch
    grads = {}
    for clip in (True, False):
        x = a.clone().requires_grad_(True)
        loss, stats = copo_terms(x, x0_old.float(), anchors, adv, eps=1e-4, clip=clip)
        loss.backward()
        grads[clip] = x.grad.abs().max().item()
        assert stats["ratio_dev_max"] > 1e-4
    assert grads[True] == 0.0 and grads[False] > 0.0


# ---------------------------------------------------------------------------------------------------
# replay on a real (tiny) model: the fresh LoRA reproduces the stored predictions, both context modes
def _entry(sampler, cfg, text, pivot, kv=None):
    group = sampler.fork_group(text, sampler.noise_bank(3), pivot, 4, 0.5)
    return Entry.from_fork_group(
        group, entry_id="e", run_id="r", policy_id="p", prompt="x", prompt_id="x", config_name=cfg.name,
        arch_id=cfg.arch_id, timesteps=list(sampler.schedule.timesteps),
        rewards={"r": torch.tensor([0.1, 0.4, 0.2, 0.3])}, reward_weights={"r": 1.0}, kv=kv or {},
    )  # fmt: skip


@pytest.mark.parametrize("pivot", [0, 2])
def test_replay_reproduces_stored_predictions_and_grads_reach_only_lora(pivot, text):
    cfg = tiny_config()
    base = make_model(cfg)
    sampler = Sampler(base, cfg)
    with torch.no_grad():
        entry = _entry(sampler, cfg, text, pivot)
    entry.kv = prefix_kv(sampler, entry.context, text)  # what collect --store-kv stores
    peft = attach_lora(base, LoraSettings(rank=4, alpha=8))
    replay_sampler = Sampler(peft.base_model.model, cfg)
    steps = torch.arange(4).repeat(2)
    x_t = torch.cat([entry.x_t[0], entry.x_t[3]])
    for mode in ("recompute", "stored"):
        pred = PivotReplay(replay_sampler, mode).predict(entry, text, x_t, steps)
        want = torch.cat([entry.x0_old[0], entry.x0_old[3]])
        assert (pred - want).abs().max() < 1e-5, mode
    pred.pow(2).mean().backward()
    trained = {n for n, p in peft.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert trained and all("lora_" in n for n in trained)
    assert any("cross_attn.k" in n for n in trained)  # text k/v recomputed inside the graph
