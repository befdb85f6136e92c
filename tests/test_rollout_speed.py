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


def test_a_grown_buffer_frees_the_old_one_before_taking_the_new():
    """Growing a kept buffer holds the new size only, never old + new at once."""
    from streamalign.models.kv_cache import KVBuffers
    from streamalign.models.memory import LiveBytes

    bufs, cpu = KVBuffers(), torch.device("cpu")
    bufs.take(0, "k", (1, 100, 2, 8), torch.float32, cpu)  # 6,400 bytes
    with LiveBytes() as m:
        m.track(*bufs._bufs.values())  # the old buffer counts as live until its storage is released
        view = bufs.take(0, "k", (2, 300, 2, 8), torch.float32, cpu)
    assert view.shape == (2, 300, 2, 8) and bufs.nbytes() == m.current == 2 * 300 * 2 * 8 * 4
    assert m.peak == 2 * 300 * 2 * 8 * 4


def test_fake_weights_never_keep_storage(tiny):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cfg, _, _ = tiny
    with FakeTensorMode():
        sampler = Sampler(torch.nn.Linear(2, 2), cfg)  # only its parameters are looked at
        with sampler._owned_buffers("main") as buffers:
            assert buffers is None
    assert not sampler._buffers


class _CountRefreshes:
    """Wraps a model, counting its K/V-only (clean-context refresh) forwards."""

    def __init__(self, model) -> None:
        self.model, self.refreshes = model, 0

    def __call__(self, *args, kv_only: bool = False, **kwargs):
        self.refreshes += kv_only
        return self.model(*args, kv_only=kv_only, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_the_refresh_is_skipped_only_where_nothing_reads_it(tiny, text):
    cfg, model, _ = tiny
    n = cfg.num_chunks
    counted = _CountRefreshes(model)
    sampler = Sampler(model, cfg)
    sampler.model = counted
    bank = sampler.noise_bank([0])
    with torch.no_grad():
        owned = sampler.rollout(text, bank)
        assert counted.refreshes == n - 1
        given = sampler.rollout(text, bank, cache=sampler.new_cache(1))  # the caller's cache may go on
        assert counted.refreshes == 2 * n - 1
        assert torch.equal(owned, given)
        counted.refreshes = 0
        sampler.fork_group(text, sampler.noise_bank(1), 1, 4, branch_batch=2)
        assert counted.refreshes == 1 + 2 * (n - 2)  # the prefix once, each of 2 batches up to chunk n-2
        counted.refreshes = 0
        scenes = [Segment(text, 2), Segment(text, 2, hard_cut=True), Segment(text, 1)]
        cut = sampler.generate(scenes, bank)
        assert counted.refreshes == 5 - 2  # not before the cut, not the last
        counted.refreshes = 0
        kept = sampler.generate(scenes, bank, sampler.new_cache(1, 3))
        assert counted.refreshes == 5 - 1  # the cut flushes it; the caller's cache keeps the last one
        assert torch.equal(cut, kept)


@pytest.mark.parametrize("sink,window", [(0, None), (1, 5)])
def test_kv_only_forward_writes_the_full_forwards_keys_and_values(text, sink, window):
    cfg = tiny_config(frames=12, sink=sink, window=window)
    model = make_model(cfg)
    sampler = Sampler(model, cfg)
    full, only = sampler.new_cache(2), sampler.new_cache(2)
    x = torch.randn(2, cfg.latent.frames, *sampler.chunk_shape[1:])
    c = sampler.chunk_frames
    with torch.no_grad():
        for j in range(cfg.num_chunks):
            t = torch.zeros(2, c)
            chunk = x[:, j * c : (j + 1) * c]
            model(chunk, t, text if j == 0 else None, full, start_frame=j * c)
            assert model(chunk, t, text if j == 0 else None, only, start_frame=j * c, kv_only=True) is None
            for layer in range(cfg.arch.num_layers):
                assert torch.equal(full.k[layer], only.k[layer]) and torch.equal(full.v[layer], only.v[layer])
                assert torch.equal(full.cross_k[layer], only.cross_k[layer])
    with pytest.raises(ValueError, match="storing KV cache"):
        model(x[:, :c], torch.zeros(2, c), text, kv_only=True)


def test_complex_rope_equals_the_real_rotation_of_each_pair():
    from streamalign.models.wan import RopeTable, apply_rope, rope_angles

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * 4 * 5, 3, 16, generator=g)
    cos, sin = rope_angles(16, torch.arange(7, 10), 4, 5)
    a, b = x[..., 0::2], x[..., 1::2]  # the pairs, rotated as written: (a cos - b sin, a sin + b cos)
    plain = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    table = RopeTable(16, size=2)
    rot = table.get(7, 3, 4, 5, x)
    assert (apply_rope(x, rot) - plain).abs().max().item() <= 1e-6
    assert apply_rope(x.bfloat16(), rot).dtype == torch.bfloat16
    assert table.get(7, 3, 4, 5, x) is rot  # kept
    table.get(0, 3, 4, 5, x), table.get(3, 3, 4, 5, x)
    assert len(table._kept) == 2 and table.get(7, 3, 4, 5, x) is not rot  # least recently used dropped


def test_fake_inputs_get_rotations_that_are_not_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from streamalign.models.wan import RopeTable

    table = RopeTable(16)
    with FakeTensorMode():
        table.get(0, 3, 4, 5, torch.zeros(1))
    assert not table._kept


def test_noise_bank_draws_the_same_bytes_into_pinned_buffers(monkeypatch):
    import streamalign.models.noise as noise_mod
    from streamalign.models.noise import NoiseBank, derive_seed

    shape = (3, 4, 2, 2)
    plain = NoiseBank([5, 9], shape).draw(2, 1, 3)
    by_hand = torch.stack(  # the draw written out: one generator per (seed, address)
        [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(s, 2, 1, 4))) for s in (5, 9)]
    )
    assert torch.equal(plain, by_hand)
    asked = []
    monkeypatch.setattr(noise_mod, "host_empty", lambda *a, pinned=False, **k: asked.append(a[2]) or torch.empty(a[0]))
    assert torch.equal(NoiseBank([5, 9], shape, pinned=True).draw(2, 1, 3), plain) and asked == [True]


def test_the_cuda_copy_path_gives_the_same_bytes_and_waits_once_per_group(tiny, text, monkeypatch):
    """The pinned, non-blocking path forced on the CPU (pinned buffers stood in by plain ones): the same
    outputs; the device-to-host copies of each branch batch (and the prefix) not waited for, one wait per
    group."""
    import streamalign.models.noise as noise_mod
    import streamalign.models.sampler as sampler_mod
    import streamalign.models.transfer as transfer

    _, _, sampler = tiny
    with torch.no_grad():
        before = [sampler.rollout(text, sampler.noise_bank([0, 1]))]
        g = sampler.fork_group(text, sampler.noise_bank(3), 1, 5, branch_batch=2)
        before += [g.x_t, g.x0_old, g.branch_latents, g.context, g.branch_noise]
    copies, waits, staged = [], [], []
    real_to_host = transfer.to_host

    def host_empty(shape, dtype, pinned):
        staged.append(pinned)
        return torch.empty(shape, dtype=dtype)

    monkeypatch.setattr(transfer, "pins", lambda device: True)
    monkeypatch.setattr(transfer, "host_empty", host_empty)
    monkeypatch.setattr(noise_mod, "host_empty", host_empty)
    monkeypatch.setattr(sampler_mod, "pins", lambda device: True)
    monkeypatch.setattr(sampler_mod, "to_host", lambda t: copies.append(t.shape) or real_to_host(t))
    monkeypatch.setattr(sampler_mod, "wait_for_copies", lambda device: waits.append(device))
    with torch.no_grad():
        after = [sampler.rollout(text, sampler.noise_bank([0, 1]))]
        g = sampler.fork_group(text, sampler.noise_bank(3), 1, 5, branch_batch=2)
        after += [g.x_t, g.x0_old, g.branch_latents, g.context, g.branch_noise]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert len(copies) == 3 * 3 + 1 and len(waits) == 1  # x_t, x0s, latents of 3 batches, the prefix; one wait
    assert staged and all(staged)


def test_device_memory_is_asked_of_the_driver_once(tiny, monkeypatch):
    _, _, sampler = tiny
    state = dict(asked=0, reserved=2 * 2**30, allocated=1 * 2**30)

    def mem_get_info(dev):
        state["asked"] += 1
        return 10 * 2**30, 80 * 2**30

    monkeypatch.setattr(Sampler, "_device", lambda self: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: state["allocated"])
    assert sampler.free_memory() == int(0.9 * (10 + 1) * 2**30)
    state.update(reserved=5 * 2**30, allocated=4 * 2**30)  # PyTorch took 3 GiB more from the driver
    assert sampler.free_memory() == int(0.9 * (7 + 1) * 2**30)
    for _ in range(3):
        sampler.auto_branch_batch(8, 1)
    assert state["asked"] == 1


def test_decoding_to_the_host_waits_once_per_batch_and_keeps_the_bytes(monkeypatch):
    """The CUDA decode path forced on the CPU (pinned buffers stood in by plain ones): the same frames,
    every slice copied without waiting into one host buffer, one wait for the batch."""
    from diffusers import AutoencoderKLWan

    import streamalign.models.codec as codec_mod

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    codec = codec_mod.WanVAECodec(vae)
    z = torch.randn(2, 2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = codec.decode(z, device="cpu")
        waits, pinned = [], []

        def host_empty(shape, dtype, pinned_: bool = False) -> torch.Tensor:
            pinned.append(pinned_)
            return torch.empty(shape, dtype=dtype)

        monkeypatch.setattr(codec_mod, "pins", lambda device: True)
        monkeypatch.setattr(codec_mod, "host_empty", lambda shape, dtype, pinned: host_empty(shape, dtype, pinned))
        monkeypatch.setattr(codec_mod, "wait_for_copies", lambda device: waits.append(device))
        forced = codec.decode(z, device="cpu")
    assert torch.equal(plain, forced) and pinned == [True] and len(waits) == 1
