"""Attention kernels: PyTorch SDPA everywhere, flash-attn when importable on CUDA (never required).

:func:`attend` is plain multi-head attention. :func:`attend_parts` attends to keys/values given in
parts (a fork group's shared batch-1 prefix and each branch's own frames) WITHOUT concatenating them:
each part's softmax output ``o_i`` and log-sum-exp ``lse_i`` come from a fused kernel (never a
[Lq, Lk] probability matrix for all heads), and the parts are merged exactly,
``o = sum_i exp(lse_i - lse) o_i`` with ``lse = logsumexp_i lse_i`` (two at a time:
``o = lerp(o_2, o_1, sigmoid(lse_1 - lse_2))``), which is softmax attention over the union of the keys
(attention is invariant to the order of keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

try:  # pragma: no cover - exercised only on CUDA machines with flash-attn installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = None

# below this many bytes of shared keys/values per row, joining the parts costs less than merging them, and
# one kernel over the joined keys keeps small models' numbers exactly those of a single cache (the size
# depends on the prefix only, so a rollout and its training replay always take the same path)
MERGE_MIN_BYTES = 32 * 2**20
# manual fallback: bytes of float32 scores one query block may hold (all heads of one batch row)
_SCORE_BLOCK_BYTES = 256 * 2**20


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention in the Wan layout.

    q: [B, Lq, H, D]; k, v: [Bk, Lk, H, D] with Bk == B, or Bk == 1 (keys shared by all rows, e.g. one
    prompt's text for G fork branches: the queries are folded into one batch row, no copies of k/v).
    mask: optional boolean [Lq, Lk], True = may attend. Returns [B, Lq, H, D].
    """
    b, lq = q.shape[:2]
    if k.shape[0] == 1 and b > 1:
        if mask is not None:
            mask = mask.repeat(b, 1)
        return attend(q.reshape(1, b * lq, *q.shape[2:]), k, v, mask).reshape(q.shape)
    if (
        _flash_attn_func is not None and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    ):  # pragma: no cover
        return _flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention that also returns the softmax normaliser.

    q: [B, Lq, H, D]; k, v: [Bk, Lk, H, D], Bk == B or 1 (shared keys: queries folded, no k/v copies).
    Returns ``out`` [B, Lq, H, D] (q's dtype) and ``lse`` [B, Lq, H] float32, the natural-log
    ``logsumexp_j(q.k_j / sqrt(D))``. The LSE is not differentiable through the fused kernels: callers
    that need gradients use :func:`attend` on concatenated keys (see :func:`attend_parts`).
    """
    b, lq, h, d = q.shape
    if k.shape[0] == 1 and b > 1:
        out, lse = attend_lse(q.reshape(1, b * lq, h, d), k, v)
        return out.reshape(q.shape), lse.reshape(b, lq, h)
    if q.is_cuda and _flash_attn_func is not None and q.dtype in (torch.float16, torch.bfloat16):  # pragma: no cover
        out, lse, _ = _flash_attn_func(q, k, v, return_attn_probs=True)  # lse [B, H, Lq]
        return out, lse.transpose(1, 2).float()
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D] views
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
        return out.transpose(1, 2), lse.transpose(1, 2)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and d <= 256:  # pragma: no cover
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)
    if q.is_cuda:  # pragma: no cover - float32 on CUDA: memory-efficient kernel (its lse is padded on Lq)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True)[:2]
        return out.transpose(1, 2), lse[..., :lq].transpose(1, 2)
    return _attend_lse_blocked(q, k, v)


def _attend_lse_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference computation in float32 for devices/dtypes without a fused kernel, in query blocks so
    the scores held at once stay under ``_SCORE_BLOCK_BYTES`` per batch row."""
    lq, h, d = q.shape[1:]
    lk = k.shape[1]
    block = max(1, _SCORE_BLOCK_BYTES // (4 * h * max(lk, 1)))
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # [B, H, Lk, D]
    outs, lses = [], []
    for s in range(0, lq, block):
        qb = q[:, s : s + block].float().transpose(1, 2)  # [B, H, n, D]
        scores = qb @ kf.transpose(-1, -2) / math.sqrt(d)
        lse = scores.logsumexp(-1)  # [B, H, n]
        outs.append(((scores - lse[..., None]).exp() @ vf).transpose(1, 2))
        lses.append(lse.transpose(1, 2))
    return torch.cat(outs, 1).to(q.dtype), torch.cat(lses, 1)


def attend_parts(q: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention of q [B, Lq, H, D] over the union of key/value parts, each (k, v) [B or 1, Lk_i, H, D].

    One part: plain :func:`attend`. A shared prefix below ``MERGE_MIN_BYTES`` per row: joined to the own
    keys (one kernel). Larger: each part's output and LSE, merged exactly in float32
    (``o = sum_i exp(lse_i - lse) o_i``, folded pairwise), so a batch-1 part (the shared prefix) is never
    broadcast to B rows. Under autograd the forward is the same (so a training replay reproduces the
    rollout that recorded it to the last bit the kernels allow) and only the parts are saved for backward
    (a batch-1 prefix stays one copy, never B); the backward recomputes attention over the concatenated
    keys, whose gradient is the same function's (the fused kernels do not differentiate their LSE).
    Returns [B, Lq, H, D] in q's dtype.
    """
    if len(parts) == 1:
        return attend(q, *parts[0])
    flat = [t for kv in parts for t in kv]
    join = _shared_bytes_per_row(q, parts) < MERGE_MIN_BYTES  # small prefix: one kernel over the joined keys
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, *flat)):
        return _PartsAttention.apply(join, q, *flat)
    return _attend_joined(q, flat) if join else _merge_parts(q, parts)


def _shared_bytes_per_row(q: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of k and v that joining the batch-1 (shared) parts would copy for each of q's rows."""
    if q.shape[0] == 1:
        return 0
    return sum(2 * k.numel() * k.element_size() for k, _ in parts if k.shape[0] == 1)


def _attend_joined(q: torch.Tensor, flat: Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention over the parts (k0, v0, k1, v1, ...) concatenated along the keys, batch-1 parts broadcast."""
    b = q.shape[0]
    k = torch.cat([t.expand(b, *t.shape[1:]) for t in flat[::2]], dim=1)
    v = torch.cat([t.expand(b, *t.shape[1:]) for t in flat[1::2]], dim=1)
    return attend(q, k, v)


def _merge_parts(q: torch.Tensor, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    out, lse = attend_lse(q, *parts[0])
    out = out.float()
    for k, v in parts[1:]:
        o, part_lse = attend_lse(q, k, v)
        # the softmax mass of the keys merged so far vs this part's: out = w * out + (1 - w) * o, with
        # w = e^lse / (e^lse + e^part_lse) = sigmoid(lse - part_lse), numerically stable in float32
        w = torch.sigmoid(lse - part_lse).unsqueeze(-1)  # [B, Lq, H, 1]
        out = torch.lerp(o.float(), out, w)
        lse = torch.logaddexp(lse, part_lse)
    return out.to(q.dtype)


class _PartsAttention(torch.autograd.Function):
    """Forward: the joined kernel or :func:`_merge_parts`, saving only q and the parts (no per-row copies
    of a shared part). Backward: the gradient of attention over the concatenated parts, recomputed."""

    @staticmethod
    def forward(ctx, join: bool, q: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, *flat)
        dev = q.device.type  # the recomputation runs under the forward's autocast (mixed-dtype parts)
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        if join:
            return _attend_joined(q, flat)
        return _merge_parts(q, list(zip(flat[::2], flat[1::2], strict=True)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, *flat = (t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors)
        dev, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            out = _attend_joined(q, flat)
            inputs = [t for t in (q, *flat) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, inputs, grad)) if inputs else iter(())
        return None, *(next(grads) if t.requires_grad else None for t in (q, *flat))
