"""NFT (gradient identities, warped timesteps, selective KL, dynamic old/reference) and SDE-GRPO (log-prob,
solver forks) -- against slow, obvious references written here."""

from __future__ import annotations

import math

import torch

from streamalign.models.sampler import Sampler
from streamalign.train.objectives.nft import NFT, nft_terms, nft_weights, ranks, selective_kl_mask
from streamalign.train.objectives.sde_grpo import gaussian_logprob
from tests.conftest import make_model, tiny_config


def _grad(loss_fn, v):
    v = v.clone().requires_grad_(True)
    loss_fn(v).sum().backward()
    return v.grad


def test_nft_with_r1_is_flow_matching_scaled_by_beta_and_r0_pushes_away():
    g = torch.Generator().manual_seed(0)
    v_theta, v_star = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    beta = 0.1
    # plain flow matching toward x0: |v_theta - v*|^2 (mean over dims), d/dv = 2 (v_theta - v*) / D
    fm = _grad(lambda v: (v - v_star).pow(2).mean((1, 2, 3)), v_theta)
    d = 3 * 4 * 4
    assert torch.allclose(fm, 2 * (v_theta - v_star) / d)
    # at theta = theta_old (v_old = v_theta): r~ = 1 gives beta x that gradient, r~ = 0 gives -beta x it
    ones, zeros = torch.ones(5), torch.zeros(5)
    pos = _grad(lambda v: nft_terms(v, v_theta, v_star, ones, beta), v_theta)
    neg = _grad(lambda v: nft_terms(v, v_theta, v_star, zeros, beta), v_theta)
    assert torch.allclose(pos, beta * fm, atol=1e-7) and torch.allclose(neg, -beta * fm, atol=1e-7)
    # r~ = 1/2: the two pulls cancel at theta_old
    assert _grad(lambda v: nft_terms(v, v_theta, v_star, ones / 2, beta), v_theta).abs().max() < 1e-7


def test_nft_weights_clip_the_advantage():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    assert torch.allclose(nft_weights(a), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_nft_draws_only_the_samplers_warped_timesteps():
    cfg = tiny_config()
    sampler = Sampler(make_model(cfg), cfg)
    sigmas = torch.tensor(sampler.schedule.sigmas, dtype=torch.float32)
    warped = [5 * t / (1 + 4 * t) for t in (1.0, 0.75, 0.5, 0.25)]  # shift 5 of the uniform grid
    assert torch.allclose(sigmas, torch.tensor(warped), atol=1e-6)
    x0 = torch.randn(4000, 2)
    _, x_t, v_star, s = NFT().draw(x0, sigmas, torch.Generator().manual_seed(1))
    drawn = set(s.flatten().tolist())
    assert drawn == set(sigmas.tolist())  # every warped sigma, nothing else (not the un-warped 0.75, 0.5, 0.25)
    assert torch.allclose(x_t, (1 - s) * x0 + s * (v_star + x0), atol=1e-6)


def test_ranks_and_selective_kl_mask_on_crafted_rewards():
    assert ranks(torch.tensor([0.3, 0.1, 0.2, 0.1])).tolist() == [3.0, 0.0, 2.0, 1.0]
    primary = torch.tensor([8.0, 7, 6, 5, 4, 3, 2, 1])  # ranks 7..0
    aux = torch.stack([torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([1.0, 8, 2, 7, 3, 6, 4, 5])])
    # u = rank_p - mean(rank_aux) = [7-0, 6-4, 5-1.5, 4-4.5, 3-3, 2-5, 1-4.5, 0-5.5]
    #   = [7, 2, 3.5, -0.5, 0, -3, -3.5, -5.5]
    # non-negative: branches 0, 1, 2, 4 (n = 4); kappa 0.2 -> ceil(0.8) = 1 -> the largest u: branch 0
    assert selective_kl_mask(primary, aux, 0.2).tolist() == [True] + [False] * 7
    # kappa 0.5 -> 2 branches: u 7 and 3.5
    assert torch.nonzero(selective_kl_mask(primary, aux, 0.5)).flatten().tolist() == [0, 2]
    # a single reward: the upper half by its own rank is eligible
    assert torch.nonzero(selective_kl_mask(primary, None, 0.5)).flatten().tolist() == [0, 1]


def test_kappa_adapts_within_bounds_and_old_reference_update():
    p = torch.nn.Parameter(torch.zeros(3))
    nft = NFT(kappa=0.1, kl_target=1e-3, ref_reset_kl=0.5, decay_rate=0.1, decay_max=0.5)
    nft.bind([p])
    for _ in range(20):
        nft.after_step(1, {"kl": 1e-2})
    assert nft.kappa == 0.2
    for _ in range(40):
        nft.after_step(1, {"kl": 1e-5})
    assert nft.kappa == 0.02
    # old <- d old + (1 - d) theta with d = min(0.1 step, 0.5)
    nft.old = [torch.zeros(3)]
    with torch.no_grad():
        p.fill_(1.0)
    nft.after_step(2, {"kl": 0.0})  # d = 0.2 -> old = 0.8
    assert torch.allclose(nft.old[0], torch.full((3,), 0.8)) and nft.last_decay == 0.2
    nft.after_step(9, {"kl": 0.0})  # d capped at 0.5 -> 0.9
    assert torch.allclose(nft.old[0], torch.full((3,), 0.9))
    assert torch.equal(nft.ref[0], torch.zeros(3)) and nft.ref_resets == 0
    nft.after_step(10, {"kl": 0.6})  # KL above the threshold: reference <- policy
    assert torch.equal(nft.ref[0], torch.ones(3)) and nft.ref_resets == 1
    tensors, meta = nft.state_dict()
    again = NFT()
    again.bind([p])
    again.load_state_dict(tensors, meta)
    assert again.kappa == nft.kappa and torch.equal(again.old[0], nft.old[0]) and again.ref_resets == 1


def test_sde_grpo_logprob_equals_the_gaussian_density():
    g = torch.Generator().manual_seed(2)
    x, mean = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    std = torch.tensor([0.3, 0.9375, 1.0])
    ours = gaussian_logprob(x, mean, std)
    ref = torch.stack(
        [torch.distributions.Normal(mean[i].double(), float(std[i])).log_prob(x[i].double()).sum() for i in range(3)]
    )
    assert torch.allclose(ours, ref, atol=1e-9)
    # element by element, the slow way
    i = 1
    slow = sum(-((a - m) ** 2) / (2 * 0.9375**2) - math.log(0.9375) - 0.5 * math.log(2 * math.pi)
               for a, m in zip(x[i].flatten().tolist(), mean[i].flatten().tolist(), strict=True))  # fmt: skip
    assert abs(ours[i].item() - slow) < 1e-6


def test_solver_forks_share_the_initial_noise_and_differ_in_the_re_noising():
    cfg = tiny_config()
    sampler = Sampler(make_model(cfg), cfg)
    text = torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim)
    grp = sampler.fork_group(text, sampler.noise_bank(4), pivot=1, group_size=3, fork="solver")
    assert torch.equal(grp.x_t[0, 0], grp.x_t[1, 0]) and torch.equal(grp.x_t[0, 0], grp.x_t[2, 0])
    assert not torch.allclose(grp.x_t[0, 1], grp.x_t[1, 1])  # the step-1 re-noise differs per branch
    only_2 = sampler.fork_group(text, sampler.noise_bank(4), pivot=1, group_size=3, fork="solver", solver_steps=[2])
    assert torch.equal(only_2.x_t[0, 1], only_2.x_t[1, 1]) and not torch.allclose(only_2.x_t[0, 2], only_2.x_t[1, 2])
    init = sampler.fork_group(text, sampler.noise_bank(4), pivot=1, group_size=3)
    assert not torch.equal(init.x_t[0, 0], init.x_t[1, 0])  # the default fork: initial noise
