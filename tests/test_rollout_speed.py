"""Rollout speed-ups keep every output: kept KV storage, skipped final refreshes, cached RoPE angles."""

from __future__ import annotations

import pytest
import torch

from streamalign.models.sampler import Sampler, Segment

from .conftest import make_model, tiny_config


def _calls(sampler: Sampler, text: torch.Tensor) -> list[torch.Tensor]:
    """Rollouts, fork groups and scenes of different shapes, one after the other on one sampler."""
    out = [sampler.rollout(text, sampler.noise_bank([1, 2]))]
    for pivot in (1, 0, 3):
        g = sampler.fork_group(text, sampler.noise_bank(5), pivot, 3, branch_batch=2)
        out += [g.x_t, g.x0_old, g.branch_latents, g.context]
    out.append(sampler.rollout(text, sampler.noise_bank([3]), num_chunks=2))
    scenes = [Segment(text, 2), Segment(text, 1, hard_cut=True), Segment(text * 0.5, 2)]
    out.append(sampler.generate(scenes, sampler.noise_bank([4])))
    out.append(sampler.rollout(text, sampler.noise_bank([1, 2])))
    return out


@pytest.mark.parametrize("sink,window", [(0, None), (1, 5)])
def test_kept_kv_storage_gives_the_bytes_of_fresh_caches(text, sink, window, monkeypatch):
    cfg = tiny_config(frames=12, sink=sink, window=window)
    sampler = Sampler(make_model(cfg), cfg)
    with torch.no_grad():
        kept = _calls(sampler, text)
        assert sampler._buffers  # storage was kept
        monkeypatch.setattr(Sampler, "_reuses_storage", lambda self: False)
        fresh = _calls(Sampler(sampler.model, cfg), text)
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh, strict=True))


def test_kv_storage_is_allocated_once_per_shape(tiny, text):
    cfg, model, _ = tiny
    sampler = Sampler(model, cfg)
    with torch.no_grad():
        sampler.rollout(text, sampler.noise_bank([0, 1]))
        ptrs = [t.data_ptr() for t in sampler._buffers["main"]._bufs.values()]
        sampler.rollout(text, sampler.noise_bank([2]))  # smaller: a view of the same storage
        sampler.rollout(text, sampler.noise_bank([3, 4]))
    assert [t.data_ptr() for t in sampler._buffers["main"]._bufs.values()] == ptrs


def test_fake_weights_never_keep_storage(tiny):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg, _, _ = tiny
    with FakeTensorMode():
        sampler = Sampler(torch.nn.Linear(2, 2), cfg)  # only its parameters are looked at
        with sampler._owned_buffers("main") as buffers:
            assert buffers is None
    assert not sampler._buffers
