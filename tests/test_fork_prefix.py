"""Fork groups without copies of the shared prefix: LSE-merged attention parts, prefix-sharing cache
expansions, branch batching, and the KV cache dtype."""

from __future__ import annotations

import pytest
import torch

from streamalign.models import attention
from streamalign.models.attention import attend, attend_lse, attend_parts
from streamalign.models.noise import ForkNoise
from streamalign.models.sampler import Sampler

from .conftest import make_model, tiny_config
from .test_sampler import fork_as_explicit


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_attend_parts_equals_attention_over_concatenated_keys(dtype, tol):
    g = torch.Generator().manual_seed(0)
    b, h, d = 3, 2, 16
    q = torch.randn(b, 11, h, d, generator=g).to(dtype)
    kp, vp = (torch.randn(1, 13, h, d, generator=g).to(dtype) for _ in range(2))  # shared by the rows
    ko, vo = (torch.randn(b, 5, h, d, generator=g).to(dtype) for _ in range(2))  # each row's own
    full = attend(
        q.float(),
        torch.cat([kp.expand(b, -1, -1, -1), ko], 1).float(),
        torch.cat([vp.expand(b, -1, -1, -1), vo], 1).float(),
    )
    merged = attend_parts(q, [(kp, vp), (ko, vo)])
    assert merged.dtype == dtype and merged.shape == q.shape
    assert (merged.float() - full).abs().max().item() < tol


def test_fused_lse_equals_blocked_reference(monkeypatch):
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(2, 9, 3, 8, generator=g),
        torch.randn(2, 21, 3, 8, generator=g),
        torch.randn(2, 21, 3, 8, generator=g),
    )
    out, lse = attend_lse(q, k, v)
    monkeypatch.setattr(attention, "_SCORE_BLOCK_BYTES", 4 * 3 * 21 * 2)  # 2 queries per block
    ref_out, ref_lse = attention._attend_lse_blocked(q, k, v)
    scores = torch.einsum("bqhd,bkhd->bqhk", q, k) / 8**0.5
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(out, attend(q, k, v), atol=1e-6)


@pytest.mark.parametrize("sink,window", [(0, None), (1, 5), (0, 6)])
@pytest.mark.parametrize("pivot,branch_batch", [(0, 1), (2, 3), (3, None)])
def test_branch_batches_equal_independent_rollouts(text, sink, window, pivot, branch_batch):
    cfg = tiny_config(sink=sink, window=window)
    sampler = Sampler(make_model(cfg), cfg)
    bank = sampler.noise_bank(31)
    grp = sampler.fork_group(text, bank, pivot=pivot, group_size=4, branch_batch=branch_batch)
    fork = ForkNoise(bank, pivot, torch.cat([bank.delta(pivot, i) for i in range(4)]), 0.5)
    videos = grp.videos()
    for i in range(4):
        solo = sampler.rollout(text, fork_as_explicit(bank, fork, i, sampler, cfg.num_chunks))
        assert (videos[i] - solo[0]).abs().max().item() < 1e-5, i
    assert grp.x_t.shape[:2] == (4, len(sampler.schedule)) and torch.equal(grp.x0_old[:, -1], grp.branch_latents[:, :3])


def test_expansion_keeps_only_the_branch_frames_and_reads_the_prefix_in_place(tiny, text):
    cfg, _model, sampler = tiny
    bank = sampler.noise_bank(3)
    prefix = sampler.new_cache(1, 2)  # holds exactly the 2-chunk prefix
    sampler.rollout(text, bank, num_chunks=2, cache=prefix)
    n, c, tpf = cfg.num_chunks, sampler.chunk_frames, cfg.tokens_per_frame
    branches = prefix.expand(5, n * c)
    assert branches.nbytes() == prefix.nbytes()  # nothing allocated before the branches write
    fork = ForkNoise(bank, 2, torch.randn(5, *sampler.chunk_shape), 0.5)
    with torch.no_grad():
        sampler.denoise_chunk(branches, 2, fork, text)
    own = branches.k[0]
    assert own.shape == (5, (n - 2) * c * tpf, cfg.arch.num_heads, cfg.arch.head_dim)
    assert branches.prefix_k[0].data_ptr() == prefix.k[0].data_ptr()  # the prefix is read where it is
    own_bytes = 2 * cfg.arch.num_layers * own.untyped_storage().nbytes()
    assert branches.nbytes() == prefix.nbytes() + own_bytes
    # the compatibility read gives the concatenated keys the old layout had
    plan = branches.plan(2 * c, c)
    k, _v = branches.write_and_read(0, plan, own[:, : c * tpf], own[:, : c * tpf])
    assert k.shape[:2] == (5, 3 * c * tpf) and torch.equal(k[3, : 2 * c * tpf], prefix.k[0][0, : 2 * c * tpf])


def test_gradients_through_an_expansion_equal_a_copied_prefix(tiny, text):
    """Training replays the pivot chunk with gradients over an expansion: the result and the gradients
    equal those of a batch-N cache holding N copies of the prefix."""
    _cfg, model, sampler = tiny
    bank = sampler.noise_bank(8)
    latents = sampler.rollout(text, bank, num_chunks=2)
    x = torch.randn(3, *sampler.chunk_shape)
    c = sampler.chunk_frames

    def run(cache):
        model.zero_grad()
        out = sampler.predict_x0(x, 937.5, 0.9375, text, cache, 2 * c)
        (out**2).mean().backward()
        return out.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    prefix = sampler.new_cache(1, 3)
    sampler.write_context(prefix, latents, text)
    copied = sampler.new_cache(3, 3)
    sampler.write_context(copied, latents.expand(3, -1, -1, -1, -1), text)
    out_e, grads_e = run(prefix.expand(3))
    out_c, grads_c = run(copied)
    assert (out_e - out_c).abs().max().item() < 1e-5
    assert sum(g.abs().sum() for g in grads_c) > 0
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(grads_e, grads_c, strict=True))
    with torch.no_grad():  # and the merged (no-grad) path gives the same prediction
        assert (sampler.predict_x0(x, 937.5, 0.9375, text, prefix.expand(3), 2 * c) - out_c).abs().max() < 1e-5


def test_kv_cache_takes_the_compute_dtype(text):
    cfg = tiny_config()
    model = make_model(cfg).to(torch.bfloat16)
    sampler = Sampler(model, cfg)
    assert sampler.new_cache(1).k[0].dtype == torch.bfloat16
    assert sampler.new_cache(1, dtype=torch.float32).k[0].dtype == torch.float32
    grp = sampler.fork_group(text, sampler.noise_bank(2), pivot=1, group_size=3, branch_batch=2)
    ref = Sampler(make_model(cfg), cfg).fork_group(text, sampler.noise_bank(2), pivot=1, group_size=3)
    assert torch.isfinite(grp.videos()).all()
    assert (grp.videos() - ref.videos()).abs().mean() < 0.05 * ref.videos().abs().mean()  # bf16 rounding only


def test_auto_branch_batch_follows_the_memory_budget(tiny, text, monkeypatch):
    _cfg, _model, sampler = tiny
    per = sampler.branch_bytes(1)
    assert [sampler.auto_branch_batch(12, 1, memory_budget=k * per + per // 2) for k in (0, 1, 5, 40)] == [1, 1, 5, 12]
    assert sampler.branch_bytes(0) > sampler.branch_bytes(3)  # a longer shared prefix leaves less per branch
    sizes = []
    original = ForkNoise.branches

    def spy(self, start, stop):
        sizes.append(stop - start)
        return original(self, start, stop)

    monkeypatch.setattr(ForkNoise, "branches", spy)
    batched = sampler.fork_group(text, sampler.noise_bank(5), 1, 5, memory_budget=2 * per)
    assert sizes == [2, 2, 1]
    whole = sampler.fork_group(text, sampler.noise_bank(5), 1, 5)
    assert sizes[3:] == [5]  # tiny branches: one batch under the default budget
    assert (batched.videos() - whole.videos()).abs().max().item() < 1e-5
