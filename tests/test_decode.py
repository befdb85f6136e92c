"""Decoding at real size: the Wan VAE decodes one video and one latent frame at a time (equal to one
whole-batch decode), frames leave the device as they are decoded, and a hard cut is a cut for the causal
Wan VAE too (a tiny random ``AutoencoderKLWan`` built in code)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from streamalign.models.codec import PixelUnshuffleCodec, WanVAECodec
from streamalign.models.sampler import Segment
from streamalign.pipeline import Pipeline

from .conftest import make_model, tiny_config


@pytest.fixture(scope="module")
def codec() -> WanVAECodec:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # fmt: skip
    return WanVAECodec(vae)


def whole_decode(codec: WanVAECodec, z: torch.Tensor) -> torch.Tensor:
    """The reference: one ``vae.decode`` call over the whole batch (what the codec did before)."""
    x = z.transpose(1, 2).float() * codec.std + codec.mean
    return (codec.vae.decode(x).sample.float().clamp(-1, 1).transpose(1, 2) + 1) / 2


def test_sliced_decode_equals_one_whole_batch_decode(codec):
    z = torch.randn(2, 4, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    # a fresh VAE decodes latent frame by latent frame from its first call on (its cache made on demand)
    slices = [(b, start, f.shape[0]) for b, start, f in codec.decode_slices(z)]
    assert slices == [(b, s, n) for b in (0, 1) for s, n in ((0, 1), (1, 4), (5, 4), (9, 4))]
    ref = whole_decode(codec, z)
    out = codec.decode(z)
    assert out.shape == ref.shape == (2, 13, 3, 32, 32)  # 4 (f - 1) + 1 frames, 8x spatial
    assert (out - ref).abs().max() < 1e-5  # batch 1 vs batch 2 convolutions: float rounding only
    levels = codec.decode(z, uint8=True)
    assert levels.dtype == torch.uint8 and torch.equal(levels, (out * 255).round().to(torch.uint8))
    assert codec.decode(z, device="meta").device.type == "meta"  # frames sent wherever asked (the host)


def test_pixel_codec_decodes_to_a_device_and_to_levels():
    codec = PixelUnshuffleCodec(spatial=2)
    z = torch.rand(1, 3, 12, 4, 4) * 2 - 1
    assert torch.equal(codec.decode(z, uint8=True), (codec.decode(z) * 255).round().to(torch.uint8))
    assert codec.decode(z, device="meta").device.type == "meta"


class HashText:
    """A deterministic stand-in text encoder: a fixed random embedding per prompt."""

    dim, max_len = 32, 7

    def encode(self, prompts: list[str]) -> torch.Tensor:
        seeds = [int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) for p in prompts]
        return torch.stack([torch.randn(self.max_len, self.dim, generator=torch.Generator().manual_seed(s))
                            for s in seeds])  # fmt: skip


def test_a_hard_cut_is_a_cut_for_the_wan_vae(codec):
    """Frames after '#' do not depend on the scene before it: each run between hard cuts is decoded on its
    own (one causal VAE pass over the whole video would carry the first scene into the second)."""
    cfg = tiny_config().with_overrides(latent={"height": 4, "width": 4})
    policy = Pipeline(cfg, make_model(cfg), HashText(), codec, "test")
    sampler = policy.sampler
    c = cfg.sampler.chunk_frames
    lat = {}
    for first in ("one", "two"):
        segments = [Segment(policy.text.encode([first]), 2), Segment(policy.text.encode(["three"]), 2, hard_cut=True)]
        lat[first] = sampler.generate(segments, sampler.noise_bank([3]))
    assert torch.equal(lat["one"][:, 2 * c :], lat["two"][:, 2 * c :])  # the sampler's cut: equal latents after it
    a, b = (policy.decode_scenes(lat[k], [2 * c, 2 * c])[0] for k in ("one", "two"))
    run = 4 * (2 * c - 1) + 1  # frames of a 6-latent-frame run
    assert a.shape == (2 * run, 3, 32, 32)
    assert (a[:run] - b[:run]).abs().max() > 1e-3
    assert torch.equal(a[run:], b[run:])
    assert torch.equal(policy.generate_scenes([("one", 2, False), ("three", 2, True)], seed=3), a)
    # the test can fail: decoded in one pass, the frames after the cut remember the first scene
    whole_a, whole_b = policy.decode(lat["one"])[0], policy.decode(lat["two"])[0]
    assert (whole_a[-run + 1 :] - whole_b[-run + 1 :]).abs().max() > 1e-3
