"""Causal Wan2.1 DiT: the generator of Self-Forcing, Causal-Forcing, LongLive and Krea-realtime.

State-dict keys are the bare Wan/Self-Forcing keys (``patch_embedding.weight``, ``blocks.0.self_attn.q.weight``,
...), so released checkpoints load strictly. The model predicts the flow ``v = noise - x0`` for latents
``x [B, F, C, H, W]`` at per-frame timesteps ``t [B, F]`` (0..1000).

Two ways to run it:
- with a :class:`~streamalign.models.kv_cache.KVCache`: one chunk of frames starting at ``start_frame``
  attends to itself and to the cached frames (generation);
- without a cache: the whole sequence at once under a block-causal mask (chunk-wise causal, optionally
  sink + window), which gives the same result as chunk-by-chunk generation with a cache.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint

from ..schemas.config import ArchConfig
from .attention import attend, attend_parts
from .kv_cache import CachePlan, KVCache
from .protocol import ModelFamily, register_family

ROPE_THETA = 10000.0


# ---------------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------------
def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding ``cat[cos, sin]`` (base 10000) in float64: t [N] -> [N, dim]."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_angles(head_dim: int, frames: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE cos/sin for tokens in (f, h, w) order: returns two float32 tensors [F*h*w, 1, head_dim/2].

    The head dim is split into complex pairs of adjacent channels: ``c - 2*(c//3)`` pairs rotate with the
    absolute frame index, ``c//3`` with the row, ``c//3`` with the column (c = head_dim/2; 22/21/21 at 128).
    """
    c = head_dim // 2
    sizes = (c - 2 * (c // 3), c // 3, c // 3)
    dev = frames.device

    def ang(pos: torch.Tensor, n: int) -> torch.Tensor:
        inv = 1.0 / ROPE_THETA ** (torch.arange(0, 2 * n, 2, dtype=torch.float64, device=dev) / (2 * n))
        return torch.outer(pos.to(torch.float64), inv)

    af = ang(frames, sizes[0])
    ah = ang(torch.arange(h, device=dev), sizes[1])
    aw = ang(torch.arange(w, device=dev), sizes[2])
    nf = af.shape[0]
    full = torch.cat(
        [
            af[:, None, None, :].expand(nf, h, w, sizes[0]),
            ah[None, :, None, :].expand(nf, h, w, sizes[1]),
            aw[None, None, :, :].expand(nf, h, w, sizes[2]),
        ],
        dim=-1,
    ).reshape(nf * h * w, 1, c)
    return torch.cos(full).float(), torch.sin(full).float()


class RopeTable:
    """The complex rotations ``cos + i sin`` [F*h*w, 1, head_dim/2] (complex64) of :func:`rope_angles`, kept
    per (first frame, frames, h, w, device): a chunk's rotations are built once, not on every forward.
    At most `size` kept (least recently used dropped: a rolling cache's positions grow without end)."""

    def __init__(self, head_dim: int, size: int = 64) -> None:
        self.head_dim, self.size = head_dim, size
        self._kept: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    @staticmethod
    def build(head_dim: int, frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return torch.complex(*rope_angles(head_dim, frames, h, w))

    def get(self, start: int, nf: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """The rotations of frames ``start .. start+nf-1`` on `like`'s device. Fake inputs (a plan) and
        forwards under a measuring dispatch mode get rotations built for the call, never kept (a plan and
        the real tensors it is checked against then allocate the same)."""
        if is_fake(like) or _get_current_dispatch_mode() is not None:
            return self.build(self.head_dim, torch.arange(start, start + nf, device=like.device), h, w)
        key = (start, nf, h, w, like.device)
        table = self._kept.get(key)
        if table is None:
            table = self.build(self.head_dim, torch.arange(start, start + nf, device=like.device), h, w)
            self._kept[key] = table
            if len(self._kept) > self.size:
                self._kept.popitem(last=False)
        self._kept.move_to_end(key)
        return table


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by the complex rotations rot [L, 1, D/2]: one complex
    multiply, ``(a + ib)(cos + i sin)`` = ``(a cos - b sin) + i (a sin + b cos)`` in float32.

    rot given as its real view [L, 1, D/2, 2] (cos, sin): the same rotation in real arithmetic, for the
    compiled blocks (inductor generates no code for complex ops; the real form fuses with the RMSNorm)."""
    if not rot.is_complex():
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rot.unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


def block_causal_mask(
    num_frames: int,
    tokens_per_frame: int,
    chunk_frames: int,
    sink: int = 0,
    window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean [L, L] mask (True = attend): a token of chunk j sees every frame of chunks <= j, limited to
    the sink frames plus the last `window` frames when `window` is set (the rolling cache's view)."""
    f = torch.arange(num_frames, device=device)
    end = (f // chunk_frames + 1) * chunk_frames  # exclusive end frame of each query frame's chunk
    q_end, k_f = end[:, None], f[None, :]
    allowed = k_f < q_end
    if window is not None:
        allowed &= (k_f < sink) | (k_f >= q_end - window)
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def teacher_forcing_mask(num_frames: int, tokens_per_frame: int, chunk_frames: int) -> torch.Tensor:
    """Boolean [2L, 2L] mask for one pass over ``[clean frames; noisy frames]`` (L = F*T tokens each).

    Clean tokens see clean chunks <= their own (block-causal, as the cache's t=0 refresh writes them);
    a noisy token of chunk j sees the clean chunks < j and its own noisy chunk -- what chunk j attends to
    during generation. Use with frame positions ``cat[arange(F), arange(F)]``.
    """
    f = torch.arange(num_frames)
    chunk = f // chunk_frames
    causal = chunk[None, :] <= chunk[:, None]
    prior = chunk[None, :] < chunk[:, None]
    same = chunk[None, :] == chunk[:, None]
    top = torch.cat([causal, torch.zeros_like(causal)], dim=1)
    bottom = torch.cat([prior, same], dim=1)
    frames = torch.cat([top, bottom], dim=0)
    return frames.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


# ---------------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm over the last dim computed in float32 (Wan: over the full dim, before the head split)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input dtype (no affine parameters unless asked)."""

    def __init__(self, dim: int, eps: float, affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).type_as(x)


class Attention(nn.Module):
    """q, k, v, o projections with Wan's RMSNorm on q and k (over the full dim)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        d = arch.dim
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, arch.eps) if arch.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(d, arch.eps) if arch.qk_norm else nn.Identity()


class SelfAttention(Attention):
    def _heads(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        return (*x.shape[:2], self.num_heads, self.head_dim)

    def keys_values(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated keys and the values of x [B, S, dim]: each [B, S, heads, head_dim]."""
        return apply_rope(self.norm_k(self.k(x)).view(self._heads(x)), rope), self.v(x).view(self._heads(x))


class CrossAttention(Attention):
    """Text cross-attention: no RoPE, no mask; k/v cached per prompt when a KV cache is given."""

    def attend_text(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The cross-attention's output [B, S, dim] for x [B, S, dim] over the text k, v of
        :meth:`text_keys_values`."""
        q = self.norm_q(self.q(x)).view(x.shape[0], -1, self.num_heads, self.head_dim)
        return self.o(attend(q, k, v).flatten(2))

    def text_keys_values(
        self, context: torch.Tensor | None, cache: KVCache | None, layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text k, v [B or 1, text_len, heads, head_dim]: the cache's, or computed (and kept in a
        storing cache)."""
        if cache is not None and cache.cross_k[layer] is not None:
            return cache.cross_k[layer], cache.cross_v[layer]
        if context is None:
            raise ValueError("no text context given and none cached")
        bc = context.shape[0]
        k = self.norm_k(self.k(context)).view(bc, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(bc, -1, self.num_heads, self.head_dim)
        if cache is not None and cache.store:
            cache.cross_k[layer], cache.cross_v[layer] = k, v
        return k, v


class Block(nn.Module):
    """One transformer block. Its forward is three regions around the self-attention over the cache:
    :meth:`qkv` (modulation, LN1, q/k/v projections, q/k RMSNorm, RoPE), the attention itself (eager: what it
    reads grows with the cache), and :meth:`rest` (o projection, gate, cross-attention, FFN). The two
    regions see the chunk's tensors only, whose shapes are the same for every chunk of a rollout, so
    :func:`compile_blocks` compiles them once per batch shape (not once per chunk or cache length)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        d = arch.dim
        self.norm1 = LayerNorm(d, arch.eps)
        self.self_attn = SelfAttention(arch)
        self.norm3 = LayerNorm(d, arch.eps, affine=True) if arch.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(arch)
        self.norm2 = LayerNorm(d, arch.eps)
        self.ffn = nn.Sequential(nn.Linear(d, arch.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(arch.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)
        # the compiled regions (set by compile_blocks; None: eager)
        self.compiled: dict[str, Callable] | None = None

    def _attn_input(self, x: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The self-attention's input: LN1(x) * (1 + scale1) + shift1, per frame."""
        shift1, scale1 = mods[:2]
        return (self.norm1(x).unflatten(1, (mods[0].shape[1], -1)) * (1 + scale1) + shift1).flatten(1, 2)

    def _mods(self, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """shift1, scale1, gate1, shift2, scale2, gate2, each [B, F, 1, dim]."""
        return (self.modulation.unsqueeze(1) + e0).chunk(6, dim=2)

    def kv(self, x: torch.Tensor, e0: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Region 1 without q (a K/V-only refresh): the rotated keys and the values [B, S, heads, head_dim]."""
        return self.self_attn.keys_values(self._attn_input(x, self._mods(e0)), rope)

    def qkv(self, x: torch.Tensor, e0: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Region 1: the rotated queries and keys and the values [B, S, heads, head_dim] of x [B, S, dim]."""
        sa = self.self_attn
        h = self._attn_input(x, self._mods(e0))
        q = apply_rope(sa.norm_q(sa.q(h)).view(sa._heads(h)), rope)
        return (q, *sa.keys_values(h, rope))

    def rest(
        self, x: torch.Tensor, attn: torch.Tensor, e0: torch.Tensor, text_k: torch.Tensor, text_v: torch.Tensor
    ) -> torch.Tensor:
        """Region 2: the block's output from its input x [B, S, dim], the self-attention's heads attn
        [B, S, heads, head_dim] (before the o projection) and the text k/v [B or 1, text_len, heads, head_dim]."""
        nf = e0.shape[1]
        _shift1, _scale1, gate1, shift2, scale2, gate2 = self._mods(e0)

        def per_frame(h: torch.Tensor) -> torch.Tensor:
            return h.unflatten(1, (nf, -1))

        x = x + (per_frame(self.self_attn.o(attn.flatten(2))) * gate1).flatten(1, 2)
        x = x + self.cross_attn.attend_text(self.norm3(x), text_k, text_v)
        y = self.ffn((per_frame(self.norm2(x)) * (1 + scale2) + shift2).flatten(1, 2))
        return x + (per_frame(y) * gate2).flatten(1, 2)

    def _region(self, name: str, *args: torch.Tensor):
        """Region `name` of this block, compiled when :func:`compile_blocks` set it and the inputs are real
        tensors outside a measuring dispatch mode (plans, memory checks and fake tensors run it eagerly)."""
        if self.compiled is not None and not is_fake(args[0]) and _get_current_dispatch_mode() is None:
            if name != "rest":  # RoPE in real arithmetic (a view of the rotations: no copy)
                args = (*args[:2], torch.view_as_real(args[2]))
            return self.compiled[name](self, *args)
        return getattr(self, name)(*args)

    def write_kv(self, x, e0, context, rope, cache: KVCache, plan: CachePlan, layer: int) -> None:
        """Only what this block stores in the cache for x (its self-attention k/v, and the text k/v if not
        yet kept): the same tensors :meth:`forward` stores, without computing its output."""
        k, v = self._region("kv", x, e0, rope)
        cache.write(layer, plan, k, v)
        self.cross_attn.text_keys_values(context, cache, layer)

    def forward(self, x, e0, context, rope, cache, plan, layer, mask, kv_only: bool = False) -> torch.Tensor | None:
        """x [B, F*T, dim]; e0 [B, F, 6, dim] per-frame time projection. ``kv_only``: only :meth:`write_kv`
        (through the module call, so hooks such as FSDP2's unsharding of the weights run), returns None."""
        if kv_only:
            self.write_kv(x, e0, context, rope, cache, plan, layer)
            return None
        q, k, v = self._region("qkv", x, e0, rope)
        if cache is not None:  # a fork group's shared prefix comes as its own batch-1 part (no copies)
            attn = attend_parts(q, cache.write_and_read_parts(layer, plan, k, v))
        else:
            attn = attend(q, k, v, mask)
        text_k, text_v = self.cross_attn.text_keys_values(context, cache, layer)
        return self._region("rest", x, attn, e0, text_k, text_v)


class Head(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(arch.dim, arch.eps)
        self.head = nn.Linear(arch.dim, math.prod(arch.patch_size) * arch.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, arch.dim) / arch.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, F*T, dim]; e [B, F, dim] time embedding (before the 6x projection)."""
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head(self.norm(x).unflatten(1, (e.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------
class CausalWanModel(nn.Module):
    """The Wan2.1 causal DiT (a :class:`~streamalign.models.protocol.ChunkModel`, family ``wan``)."""

    lora_targets = ("q", "k", "v", "o", "ffn.0", "ffn.2")  # attention projections and the FFN of every block
    # activation checkpointing per block under autograd: each block keeps only its input for backward and
    # recomputes the rest there (set by training; forwards that write a storing KV cache are never
    # checkpointed: their writes must happen exactly once)
    gradient_checkpointing = False

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        d = arch.dim
        self.patch_embedding = nn.Conv3d(arch.in_dim, d, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(arch.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(arch.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([Block(arch) for _ in range(arch.num_layers)])
        self.head = Head(arch)
        self.rope = RopeTable(arch.head_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears, zero biases, N(0, .02) text/time embeddings, zero output head (as Wan)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in [*self.text_embedding, *self.time_embedding]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L<=text_len, text_dim] -> [B, text_len, dim]: zero-pad to text_len, then the text MLP."""
        b, n, c = context.shape
        if n > self.arch.text_len:
            raise ValueError(f"text context has {n} tokens, more than text_len {self.arch.text_len}")
        if c != self.arch.text_dim:
            raise ValueError(f"text context dim {c} != text_dim {self.arch.text_dim} of this model")
        pad = context.new_zeros(b, self.arch.text_len - n, c)
        return self.text_embedding(torch.cat([context, pad], dim=1).to(self.text_embedding[0].weight.dtype))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_frame: int = 0,
        chunk_frames: int | None = None,
        sink: int = 0,
        window: int | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_only: bool = False,
    ) -> torch.Tensor | None:
        """The head's prediction: the flow ``v = noise - x0`` (Wan) or x0 (``arch.prediction: x0``).

        x: [B, F, C, H, W] latents of frames ``start_frame .. start_frame+F-1``; t: [B, F] or [B] timesteps.
        context: [B or 1, L, text_dim] text embeddings; may be None when `cache` already holds them.
        cache: when given, the F frames are one chunk written to / attending through the cache.
        Without a cache the sequence is processed at once with a block-causal mask of `chunk_frames`
        (default: F, i.e. one chunk) and the optional sink/window limits, or under an explicit boolean
        token `mask` [F*T, F*T] with explicit frame `positions` [F] (teacher forcing, see
        :func:`teacher_forcing_mask`). Returns [B, F, C_out, H, W].
        ``kv_only``: only write the frames' K/V to the (storing) cache and return None: the last block stops
        after its k/v projections and the head is skipped (the clean-context refresh needs nothing else).
        """
        if kv_only and (cache is None or not cache.store):
            raise ValueError("kv_only writes a cache: give a storing KV cache")
        b, nf, _, h, w = x.shape
        _, ph, pw = self.arch.patch_size
        gh, gw = h // ph, w // pw
        if t.dim() == 1:
            t = t[:, None].expand(b, nf)
        dtype = self.patch_embedding.weight.dtype

        tokens = self.patch_embedding(x.transpose(1, 2).to(dtype))  # [B, dim, F, gh, gw]
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, F*gh*gw, dim] in (f, h, w) order
        e = self.time_embedding(sinusoidal_embedding(self.arch.freq_dim, t.flatten()).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.arch.dim)).unflatten(0, (b, nf))
        e = e.unflatten(0, (b, nf))

        need_text = cache is None or cache.cross_k[0] is None
        ctx = self.embed_text(context.to(x.device)) if (need_text and context is not None) else None  # any device
        if positions is None:
            rope = self.rope.get(start_frame, nf, gh, gw, x)
        else:
            rope = RopeTable.build(self.arch.head_dim, positions, gh, gw).to(x.device)

        plan = None
        if cache is not None:
            if mask is not None or positions is not None:
                raise ValueError("an explicit mask/positions cannot be combined with a KV cache")
            plan = cache.plan(start_frame, nf, clean=kv_only)
        elif mask is not None:
            mask = mask.to(x.device)
        elif chunk_frames is not None and (chunk_frames < nf or window is not None):
            mask = block_causal_mask(nf, gh * gw, chunk_frames, sink, window, x.device)

        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and (cache is None or not cache.store)
        for i, block in enumerate(self.blocks):
            if kv_only and i == len(self.blocks) - 1:
                return block(tokens, e0, ctx, rope, cache, plan, i, mask, kv_only=True)
            if recompute:
                tokens = checkpoint(block, tokens, e0, ctx, rope, cache, plan, i, mask, use_reentrant=False)
            else:
                tokens = block(tokens, e0, ctx, rope, cache, plan, i, mask)
        out = self.head(tokens, e)  # [B, F*gh*gw, ph*pw*C]
        return self.unpatchify(out, nf, gh, gw)

    def unpatchify(self, out: torch.Tensor, nf: int, gh: int, gw: int) -> torch.Tensor:
        """[B, F*gh*gw, (pf ph pw C)] -> [B, F, C, gh*ph, gw*pw] (Wan's 'fhwpqrc->cfphqwr' order)."""
        pf, ph, pw = self.arch.patch_size
        c = self.arch.out_dim
        u = out.reshape(out.shape[0], nf, gh, gw, pf, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bfpchqwr", u)
        return u.reshape(out.shape[0], nf * pf, c, gh * ph, gw * pw)


register_family(ModelFamily("wan", CausalWanModel))
