"""The causal Wan DiT against the reference equations, written out slowly here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamalign.models.wan import CausalWanModel, block_causal_mask, rope_angles
from streamalign.schemas.config import ArchConfig, ModelConfig

from .conftest import make_model, tiny_config


def expected_keys(num_layers: int) -> set[str]:
    keys = {
        "patch_embedding.weight",
        "patch_embedding.bias",
        "head.modulation",
        "head.head.weight",
        "head.head.bias",
    }
    for i in (0, 2):
        keys |= {
            f"text_embedding.{i}.weight",
            f"text_embedding.{i}.bias",
            f"time_embedding.{i}.weight",
            f"time_embedding.{i}.bias",
        }
    keys |= {"time_projection.1.weight", "time_projection.1.bias"}
    for n in range(num_layers):
        b = f"blocks.{n}."
        keys.add(b + "modulation")
        for att in ("self_attn", "cross_attn"):
            for p in "qkvo":
                keys |= {f"{b}{att}.{p}.weight", f"{b}{att}.{p}.bias"}
            keys |= {f"{b}{att}.norm_q.weight", f"{b}{att}.norm_k.weight"}
        keys |= {b + "norm3.weight", b + "norm3.bias"}
        for i in (0, 2):
            keys |= {f"{b}ffn.{i}.weight", f"{b}ffn.{i}.bias"}
    return keys


def test_state_dict_keys_are_bare_wan_keys():
    cfg = ModelConfig.load("tiny")
    sd = CausalWanModel(cfg.arch).state_dict()
    assert set(sd) == expected_keys(cfg.arch.num_layers)
    assert sd["blocks.0.modulation"].shape == (1, 6, cfg.arch.dim)
    assert sd["head.modulation"].shape == (1, 2, cfg.arch.dim)
    assert sd["patch_embedding.weight"].shape == (cfg.arch.dim, 16, 1, 2, 2)


def test_wan_1_3b_shapes_on_meta():
    cfg = ModelConfig.load("wan-1.3b")
    with torch.device("meta"):
        m = CausalWanModel(cfg.arch)
    sd = m.state_dict()
    assert set(sd) == expected_keys(30)
    assert sd["blocks.29.ffn.0.weight"].shape == (8960, 1536)
    assert sd["text_embedding.0.weight"].shape == (1536, 4096)
    assert sd["time_projection.1.weight"].shape == (6 * 1536, 1536)
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(1.419e9, rel=1e-3)


def test_rope_split_44_42_42():
    cos, sin = rope_angles(128, torch.arange(2), 1, 1)
    assert cos.shape == (2, 1, 64)
    # frame-rotated pairs are the first 22 (44 channels): they change with the frame, the rest do not
    changed = (sin[0, 0] != sin[1, 0]).nonzero().flatten().tolist()
    assert changed == list(range(22))


def slow_reference_forward(model: CausalWanModel, x, t, ctx, chunk):
    """Wan2.1 equations written plainly: float64 complex RoPE, explicit masked softmax attention."""
    a = model.arch
    sd = {k: v.double() for k, v in model.state_dict().items()}
    b, nf, c, h, w = x.shape
    gh, gw = h // 2, w // 2
    tok = F.conv3d(
        x.double().transpose(1, 2), sd["patch_embedding.weight"], sd["patch_embedding.bias"], stride=(1, 2, 2)
    )
    tok = tok.flatten(2).transpose(1, 2)
    half = a.freq_dim // 2
    ang = t.double().flatten()[:, None] * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    sin_emb = torch.cat([ang.cos(), ang.sin()], 1)

    def lin(z, p):
        return z @ sd[p + ".weight"].T + sd[p + ".bias"]

    e = lin(F.silu(lin(sin_emb, "time_embedding.0")), "time_embedding.2")
    e0 = lin(F.silu(e), "time_projection.1").view(b, nf, 6, a.dim)
    e = e.view(b, nf, a.dim)
    text = torch.cat([ctx.double(), ctx.new_zeros(b, a.text_len - ctx.shape[1], a.text_dim).double()], 1)
    text = lin(F.gelu(lin(text, "text_embedding.0"), approximate="tanh"), "text_embedding.2")
    hd, nh = a.head_dim, a.num_heads
    cpairs = hd // 2
    sizes = [cpairs - 2 * (cpairs // 3), cpairs // 3, cpairs // 3]

    def freqs(n, pos):
        return torch.polar(
            torch.ones(len(pos), n, dtype=torch.float64),
            torch.outer(pos.double(), 1.0 / 10000 ** (torch.arange(0, 2 * n, 2).double() / (2 * n))),
        )

    ff, fh, fw = (
        freqs(sizes[0], torch.arange(nf)),
        freqs(sizes[1], torch.arange(gh)),
        freqs(sizes[2], torch.arange(gw)),
    )
    rot = torch.cat(
        [
            ff[:, None, None].expand(nf, gh, gw, -1),
            fh[None, :, None].expand(nf, gh, gw, -1),
            fw[None, None].expand(nf, gh, gw, -1),
        ],
        -1,
    ).reshape(-1, 1, cpairs)

    def rope(z):
        zc = torch.view_as_complex(z.reshape(*z.shape[:-1], -1, 2).contiguous())
        return torch.view_as_real(zc * rot).flatten(-2)

    def rms(z, wgt):
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + a.eps) * wgt

    def ln(z):
        return F.layer_norm(z, (a.dim,), eps=a.eps)

    tpf = gh * gw
    n_tok = nf * tpf
    mask = torch.zeros(n_tok, n_tok, dtype=torch.bool)
    for qi in range(n_tok):
        q_end = (qi // tpf // chunk + 1) * chunk * tpf
        mask[qi, :q_end] = True

    def attention(q, k, v, m=None):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        if m is not None:
            s = s.masked_fill(~m, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)

    frame_of = torch.arange(n_tok) // tpf
    for n in range(a.num_layers):
        p = f"blocks.{n}."
        mod = sd[p + "modulation"][0] + e0  # [b, nf, 6, dim]
        m_tok = mod[:, frame_of]  # per token
        sh1, sc1, g1, sh2, sc2, g2 = (m_tok[:, :, i] for i in range(6))
        y = ln(tok) * (1 + sc1) + sh1
        q = rope(rms(lin(y, p + "self_attn.q"), sd[p + "self_attn.norm_q.weight"]).view(b, n_tok, nh, hd))
        k = rope(rms(lin(y, p + "self_attn.k"), sd[p + "self_attn.norm_k.weight"]).view(b, n_tok, nh, hd))
        v = lin(y, p + "self_attn.v").view(b, n_tok, nh, hd)
        tok = tok + g1 * lin(attention(q, k, v, mask).flatten(2), p + "self_attn.o")
        y = F.layer_norm(tok, (a.dim,), sd[p + "norm3.weight"], sd[p + "norm3.bias"], eps=a.eps)
        q = rms(lin(y, p + "cross_attn.q"), sd[p + "cross_attn.norm_q.weight"]).view(b, n_tok, nh, hd)
        k = rms(lin(text, p + "cross_attn.k"), sd[p + "cross_attn.norm_k.weight"]).view(b, -1, nh, hd)
        v = lin(text, p + "cross_attn.v").view(b, -1, nh, hd)
        tok = tok + lin(attention(q, k, v).flatten(2), p + "cross_attn.o")
        y = ln(tok) * (1 + sc2) + sh2
        tok = tok + g2 * lin(F.gelu(lin(y, p + "ffn.0"), approximate="tanh"), p + "ffn.2")
    hm = sd["head.modulation"][0][None, None] + e[:, :, None]  # [b, nf, 2, dim]
    hm = hm[:, frame_of]
    out = lin(ln(tok) * (1 + hm[:, :, 1]) + hm[:, :, 0], "head.head")  # [b, n_tok, 4*c] in (p q r c) order
    out = out.view(b, nf, gh, gw, 1, 2, 2, c)
    vid = torch.zeros(b, nf, c, h, w, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            for qq in range(2):
                for rr in range(2):
                    vid[:, :, :, 2 * i + qq, 2 * j + rr] = out[:, :, i, j, 0, qq, rr]
    return vid


def test_forward_matches_slow_reference():
    cfg = tiny_config(frames=6)
    model = make_model(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 16, 8, 8, generator=g)
    t = torch.tensor([[0.0] * 3 + [937.5] * 3, [625.0] * 3 + [1000.0] * 3])
    ctx = torch.randn(2, 5, cfg.arch.text_dim, generator=g)
    with torch.no_grad():
        ours = model(x, t, ctx, chunk_frames=3)
    ref = slow_reference_forward(model, x, t, ctx, chunk=3)
    assert (ours.double() - ref).abs().max().item() < 1e-5
    assert ref.abs().max().item() > 0.1  # a non-trivial output


def test_block_causal_mask_window_and_sink():
    m = block_causal_mask(num_frames=9, tokens_per_frame=1, chunk_frames=3, sink=1, window=4)
    # chunk 2 (frames 6..8) ends at 9: sees sink frame 0 and frames 5..8
    assert m[7].nonzero().flatten().tolist() == [0, 5, 6, 7, 8]
    # chunk 0 sees frames 0..2 only
    assert m[1].nonzero().flatten().tolist() == [0, 1, 2]


def test_config_validation_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ArchConfig(dim=100, ffn_dim=8, num_heads=3, num_layers=1)
    base = ModelConfig.load("tiny")
    with pytest.raises(ValueError, match="multiple of chunk_frames"):
        base.with_overrides(latent={"frames": 10})
    with pytest.raises(ValueError, match="strictly decreasing"):
        base.with_overrides(sampler={"denoising_steps": [500, 750]})
    with pytest.raises(FileNotFoundError, match="one of"):
        ModelConfig.load("no-such-model")
