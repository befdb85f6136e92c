"""Attention kernels: PyTorch SDPA everywhere, flash-attn when importable on CUDA (never required)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # pragma: no cover - exercised only on CUDA machines with flash-attn installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a broken CUDA build
    _flash_attn_func = None


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
