"""Few-step sampler, KV cache, NoiseBank and fork groups."""

from __future__ import annotations

import pytest
import torch

from streamalign.models.kv_cache import KVCache
from streamalign.models.noise import ExplicitNoise, ForkNoise, NoiseBank
from streamalign.models.sampler import Sampler, Schedule, Segment
from streamalign.schemas.config import ModelConfig, SamplerConfig

from .conftest import make_model, tiny_config


def test_warped_schedule_values():
    s = Schedule.from_config(SamplerConfig())
    assert s.timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0), abs=1e-3)
    assert s.sigmas == pytest.approx((1.0, 0.9375, 0.833333, 0.625), abs=1e-6)
    plain = Schedule.from_config(SamplerConfig(warp=False))
    assert plain.sigmas == pytest.approx((1.0, 0.75, 0.5, 0.25))


def reference_sampler(model, sampler: Sampler, ctx, noise, num_chunks, sink=0, window=None, context_chunks=None):
    """The sampler equations with no cache at all: every model call re-runs the whole prefix (clean
    context at t=0 + the current noisy chunk) through the block-causal mask. `context_chunks`: only the
    newest that many clean chunks precede the noisy one, re-based at frame 0 (Krea's recomputed context)."""
    c = sampler.chunk_frames
    sched = sampler.schedule
    clean = []
    for j in range(num_chunks):
        x = noise.initial(j)
        kept = clean if context_chunks is None else clean[len(clean) - context_chunks :]
        lead = len(kept) * c
        for i, (t_i, s_i) in enumerate(zip(sched.timesteps, sched.sigmas, strict=True)):
            seq = torch.cat([*kept, x], dim=1)
            t = torch.cat([torch.zeros(x.shape[0], lead), torch.full((x.shape[0], c), t_i)], dim=1)
            v = model(seq, t, ctx, chunk_frames=c, sink=sink, window=window)[:, lead:]
            x0 = x - s_i * v
            if i + 1 < len(sched):
                x = (1 - sched.sigmas[i + 1]) * x0 + sched.sigmas[i + 1] * noise.solver(j, i + 1)
        clean.append(x0)
    return torch.cat(clean, dim=1)


@pytest.mark.parametrize("sink,window", [(0, None), (0, 6), (1, 5), (3, 3)])
def test_chunked_cache_sampling_equals_one_shot(sink, window, text):
    cfg = tiny_config(frames=15, sink=sink, window=window)
    model = make_model(cfg)
    sampler = Sampler(model, cfg)
    bank = sampler.noise_bank(11)
    with torch.no_grad():
        ours = sampler.rollout(text, bank)
        ref = reference_sampler(model, sampler, text, bank, cfg.num_chunks, sink, window)
    assert (ours - ref).abs().max().item() < 1e-5
    assert ours.std() > 0.1


def test_rolling_cache_is_bounded_and_rejects_evicted_frames(text):
    cfg = tiny_config(frames=12, sink=1, window=5)
    sampler = Sampler(make_model(cfg), cfg)
    cache, bank = sampler.new_cache(1), sampler.noise_bank(0)
    sizes = []
    for j in range(10):  # 30 frames through 6 slots
        sampler.denoise_chunk(cache, j, bank, text)
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    assert cache.end_frame == 30
    with pytest.raises(ValueError, match="evicted"):
        cache.plan(3, 3)


def test_rewriting_a_chunk_is_idempotent(tiny, text):
    _cfg, model, sampler = tiny
    bank = sampler.noise_bank(5)
    cache = sampler.new_cache(1)
    with torch.no_grad():
        sampler.denoise_chunk(cache, 0, bank, text)
        x = bank.initial(1)
        t = torch.full((1, 3), 937.5)
        first = model(x, t, text, cache, start_frame=3)
        k_before = cache.k[0].clone()
        second = model(x, t, text, cache, start_frame=3)
    assert torch.equal(first, second)
    assert torch.equal(k_before, cache.k[0])


def test_cache_rejects_gaps_and_overflow(tiny):
    cfg, model, _ = tiny
    cache = KVCache.for_model(model, 1, cfg.tokens_per_frame, max_frames=6)
    with pytest.raises(ValueError, match="only 0 are cached"):
        cache.plan(3, 3)
    cache.plan(0, 3)
    cache.plan(3, 3)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.plan(6, 3)


def test_expand_shares_prefix_until_divergence_and_clone_is_independent(tiny, text):
    _cfg, _model, sampler = tiny
    bank = sampler.noise_bank(2)
    cache = sampler.new_cache(1)
    sampler.rollout(text, bank, num_chunks=1, cache=cache)
    shared = cache.expand(12)
    assert shared.k[0].stride(0) == 0 and shared.nbytes() == cache.nbytes()
    copy = shared.clone()
    fork = ForkNoise(bank, 1, torch.randn(12, *sampler.chunk_shape), 0.5)
    with torch.no_grad():
        sampler.denoise_chunk(shared, 1, fork, text)
    assert shared.k[0].shape[0] == 12 and shared.k[0].stride(0) != 0
    assert copy.k[0].stride(0) == 0  # the clone was not touched by the branches' writes
    assert torch.equal(copy.k[0][0], cache.k[0][0])


def test_noise_bank_is_deterministic_and_addressed():
    a = NoiseBank(7, (3, 4, 2, 2))
    b = NoiseBank(7, (3, 4, 2, 2))
    x1 = a.solver(2, 1)
    _ = a.initial(0), a.delta(1, 3)  # other draws in between change nothing
    assert a.solver(2, 1).numpy().tobytes() == x1.numpy().tobytes() == b.solver(2, 1).numpy().tobytes()
    assert not torch.equal(a.initial(2), a.solver(2, 1))
    assert not torch.equal(a.delta(1, 0), a.delta(1, 1))
    assert not torch.equal(NoiseBank(8, (3, 4, 2, 2)).initial(0), a.initial(0))
    rows = NoiseBank([7, 9], (3, 4, 2, 2)).initial(4)
    assert torch.equal(rows[0], a.initial(4)[0])


def fork_as_explicit(bank: NoiseBank, fork: ForkNoise, branch: int, sampler: Sampler, n: int) -> ExplicitNoise:
    init = torch.cat([fork.initial(j)[branch : branch + 1] for j in range(n)], dim=1)
    t = len(sampler.schedule)
    solver = torch.stack([torch.stack([bank.solver(j, i) for i in range(1, t)]) for j in range(n)])
    return ExplicitNoise(init, solver, sampler.chunk_frames)


@pytest.mark.parametrize("pivot", [0, 2, 3])
def test_fork_branch_equals_independent_rollout(tiny, text, pivot):
    cfg, _model, sampler = tiny
    bank = sampler.noise_bank(21)
    g = sampler.fork_group(text, bank, pivot=pivot, group_size=4, strength=0.5)
    c = sampler.chunk_frames
    videos = g.videos()
    deltas = torch.cat([bank.delta(pivot, i) for i in range(4)])
    fork = ForkNoise(bank, pivot, deltas, 0.5)
    for i in (0, 3):
        solo = sampler.rollout(text, fork_as_explicit(bank, fork, i, sampler, cfg.num_chunks))
        assert (videos[i] - solo[0]).abs().max().item() < 1e-5
    # shared prefix; different pivot chunks; the recorded trace is consistent with the outputs
    assert torch.equal(videos[:, : pivot * c], videos[:1, : pivot * c].expand(4, -1, -1, -1, -1))
    assert (videos[0, pivot * c :] - videos[1, pivot * c :]).abs().max() > 1e-3
    assert torch.equal(g.x_t[:, 0], g.branch_noise)
    assert torch.equal(g.x0_old[:, -1], g.branch_latents[:, :c])
    s = 0.5
    assert torch.allclose(g.branch_noise, (1 - s * s) ** 0.5 * g.eps_star + s * deltas)
    assert g.solver_noise.shape == (cfg.num_chunks, 3, *sampler.chunk_shape)


def test_fork_with_zero_strength_gives_identical_branches(tiny, text):
    _, _, sampler = tiny
    bank = sampler.noise_bank(4)
    g = sampler.fork_group(text, bank, pivot=1, group_size=3, strength=0.0)
    v = g.videos()
    assert (v - v[:1]).abs().max().item() < 1e-5
    solo = sampler.rollout(text, bank)
    assert (v[0] - solo[0]).abs().max().item() < 1e-5


def test_fork_argument_errors(tiny, text):
    _, _, sampler = tiny
    with pytest.raises(ValueError, match="pivot"):
        sampler.fork_group(text, sampler.noise_bank(0), pivot=4, group_size=2)
    with pytest.raises(ValueError, match="strength"):
        sampler.fork_group(text, sampler.noise_bank(0), pivot=0, group_size=2, strength=1.5)


def test_hard_cut_forgets_and_soft_transition_remembers(tiny):
    cfg, _model, sampler = tiny
    g = torch.Generator().manual_seed(9)
    a, b, c = (torch.randn(1, 5, cfg.arch.text_dim, generator=g) for _ in range(3))
    bank = sampler.noise_bank(3)
    hard_ab = sampler.generate([Segment(a, 2), Segment(c, 2, hard_cut=True)], bank)
    hard_bb = sampler.generate([Segment(b, 2), Segment(c, 2, hard_cut=True)], bank)
    assert (hard_ab[:, 6:] - hard_bb[:, 6:]).abs().max().item() < 1e-6
    assert (hard_ab[:, :6] - hard_bb[:, :6]).abs().max().item() > 1e-3
    soft_ab = sampler.generate([Segment(a, 2), Segment(c, 2)], bank)
    soft_bb = sampler.generate([Segment(b, 2), Segment(c, 2)], bank)
    assert (soft_ab[:, 6:] - soft_bb[:, 6:]).abs().max().item() > 1e-3
    # a soft switch is the text swap only: same as a single-prompt rollout until the switch
    assert (soft_ab[:, :6] - sampler.rollout(a, bank, num_chunks=2)).abs().max().item() < 1e-6


def test_long_video_with_rolling_cache(text):
    cfg = tiny_config(frames=12, sink=1, window=5)
    sampler = Sampler(make_model(cfg), cfg)
    out = sampler.generate([Segment(text, 9)], sampler.noise_bank(1))
    assert out.shape[1] == 27 and torch.isfinite(out).all()


def test_rollouts_and_forks_are_byte_deterministic(tiny, text):
    _, _, sampler = tiny
    a = sampler.fork_group(text, sampler.noise_bank(77), pivot=1, group_size=3)
    b = sampler.fork_group(text, sampler.noise_bank(77), pivot=1, group_size=3)
    assert a.videos().numpy().tobytes() == b.videos().numpy().tobytes()
    assert a.x0_old.numpy().tobytes() == b.x0_old.numpy().tobytes()
    c = sampler.fork_group(text, sampler.noise_bank(78), pivot=1, group_size=3)
    assert not torch.equal(a.videos(), c.videos())


@pytest.mark.slow
def test_wan_1_3b_shape_rollout_in_bf16():
    """The real-size model path: wan-1.3b dims/heads/layers, random bf16 weights, UMT5-shaped text,
    a small latent so it fits a CPU run (the 480x832 timing is bench/gpu_check.py)."""
    from streamalign.models.checkpoint import load_generator
    from streamalign.schemas.config import ModelConfig

    cfg = ModelConfig.load("wan-1.3b").with_overrides(latent={"height": 4, "width": 4, "frames": 6})
    torch.manual_seed(0)
    model = load_generator(cfg, dtype=torch.bfloat16)
    sampler = Sampler(model, cfg)
    text = torch.randn(1, 40, 4096)
    g = sampler.fork_group(text, sampler.noise_bank(0), pivot=1, group_size=2)
    assert g.videos().shape == (2, 6, 16, 4, 4) and torch.isfinite(g.videos()).all()


def test_write_context_rebuilds_the_prefix_cache(tiny, text):
    """Rebuilding K/V from stored clean latents gives the cache the rollout itself left behind."""
    _, _, sampler = tiny
    bank = sampler.noise_bank(13)
    rolled = sampler.new_cache(1)
    latents = sampler.rollout(text, bank, num_chunks=2, cache=rolled)
    rebuilt = sampler.new_cache(1)
    sampler.write_context(rebuilt, latents, text)
    n = 2 * sampler.chunk_frames * sampler.config.tokens_per_frame
    for layer in range(len(rolled.k)):
        assert torch.allclose(rebuilt.k[layer][:, :n], rolled.k[layer][:, :n], atol=1e-6)
        assert torch.allclose(rebuilt.v[layer][:, :n], rolled.v[layer][:, :n], atol=1e-6)


def test_teacher_forcing_pass_equals_cached_generation(text):
    """One pass over [clean; noisy] under teacher_forcing_mask gives, for every noisy chunk j, what the
    model predicts for it at generation time after the clean chunks < j were written to the cache."""
    from streamalign.models.wan import teacher_forcing_mask

    cfg = tiny_config(prediction="x0")
    model = make_model(cfg)
    sampler = Sampler(model, cfg)
    g = torch.Generator().manual_seed(5)
    f, c = cfg.latent.frames, cfg.sampler.chunk_frames
    clean = torch.randn(2, f, *sampler.chunk_shape[1:], generator=g)
    noisy = torch.randn(2, f, *sampler.chunk_shape[1:], generator=g)
    t_noisy = torch.tensor([[1000.0] * 3 + [937.5] * 3 + [833.3] * 3 + [625.0] * 3] * 2)
    t = torch.cat([torch.zeros_like(t_noisy), t_noisy], dim=1)
    pos = torch.cat([torch.arange(f), torch.arange(f)])
    ctx = text.expand(2, -1, -1)
    with torch.no_grad():
        one_pass = model(
            torch.cat([clean, noisy], 1), t, ctx, mask=teacher_forcing_mask(f, cfg.tokens_per_frame, c), positions=pos
        )
        cache = sampler.new_cache(2)
        for j in range(f // c):
            sl = slice(j * c, (j + 1) * c)
            s = t_noisy[0, j * c].item() / 1000
            got = sampler.predict_x0(noisy[:, sl], t_noisy[0, j * c].item(), s, ctx, cache, j * c)
            assert torch.allclose(got, one_pass[:, f:][:, sl], atol=2e-5), j
            sampler.write_context(cache, clean[:, : (j + 1) * c], ctx)  # idempotent rewrite of chunks <= j
    with pytest.raises(ValueError, match="cannot be combined"):
        model(noisy[:, :3], t_noisy[:, :3], ctx, cache, positions=pos[:3])


def krea_reference(model, sampler: Sampler, ctx, noise, num_chunks):
    """Krea Realtime's block loop written out (krea-ai/realtime-video@acf4b7b, release_server.py:588-631 and
    pipeline/self_forcing_training.py:209-275, kv_cache_num_frames 3 = num_frame_per_block): before each
    block a fresh cache gets the previous block's clean latents at t=0 attending to themselves only, at
    positions from 0, and the block is denoised right after them; no cache survives a block. Here with no
    cache at all: [previous clean chunk, noisy chunk] through the block-causal mask, re-based at frame 0."""
    return reference_sampler(model, sampler, ctx, noise, num_chunks, context_chunks=1)


@pytest.fixture
def krea() -> tuple[ModelConfig, torch.nn.Module, Sampler]:
    """The tiny model under Krea's cache policy: one recomputed chunk of context (window 6, 5 chunks)."""
    cfg = tiny_config(frames=15, window=6).with_overrides(cache={"sink": 0, "window": 6, "recompute_context": True})
    model = make_model(cfg)
    return cfg, model, Sampler(model, cfg)


def test_recomputed_context_equals_kreas_block_loop(krea, text):
    cfg, model, sampler = krea
    bank = sampler.noise_bank(5)
    with torch.no_grad():
        ours = sampler.rollout(text, bank)
        ref = krea_reference(model, sampler, text, bank, cfg.num_chunks)
        rolling = Sampler(model, tiny_config(frames=15, window=6)).rollout(text, bank)
    assert (ours - ref).abs().max().item() < 1e-5
    # the kept-K/V rolling window is another model: chunk 2 on differ
    assert (rolling[:, 6:] - ref[:, 6:]).abs().max().item() > 1e-3


def test_recomputed_context_prefix_rebuild_agrees(krea, text):
    _, _, sampler = krea
    bank = sampler.noise_bank(3)
    with torch.no_grad():
        video = sampler.rollout(text, bank)
        # the prefix rebuilt from stored clean latents (the training replay's context) gives the same chunk 3
        cache = sampler.new_cache(1)
        sampler.write_context(cache, video[:, :9], text)
        again = sampler.denoise_chunk(cache, 3, bank, text).x0
    assert (again - video[:, 9:12]).abs().max().item() < 1e-6


@pytest.mark.parametrize("sink,window", [(1, 6), (0, 9)])
def test_recomputed_context_needs_one_chunk_of_context(sink, window):
    with pytest.raises(ValueError, match="recompute_context needs sink 0 and window 6"):
        tiny_config(frames=15, window=6).with_overrides(cache={"sink": sink, "window": window,
                                                               "recompute_context": True})  # fmt: skip


@pytest.mark.parametrize("pivot", [1, 3])
def test_recomputed_context_fork_branch_equals_kreas_block_loop(krea, text, pivot):
    cfg, model, sampler = krea
    bank = sampler.noise_bank(8)
    with torch.no_grad():
        g = sampler.fork_group(text, bank, pivot=pivot, group_size=3, strength=0.5)
        deltas = torch.cat([bank.delta(pivot, i) for i in range(3)])
        fork = ForkNoise(bank, pivot, deltas, 0.5)
        for i in (0, 2):
            ref = krea_reference(model, sampler, text, fork_as_explicit(bank, fork, i, sampler, cfg.num_chunks),
                                 cfg.num_chunks)  # fmt: skip
            assert (g.videos()[i] - ref[0]).abs().max().item() < 1e-5
