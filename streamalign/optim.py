"""The learning-rate schedule every trainer uses (pre-training and alignment)."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup: int = 0, total: int | None = None, final_ratio: float | None = None) -> float:
    """Learning rate of 0-based `step`: linear warm-up over `warmup` steps, then constant, or (with
    `final_ratio`) cosine decay to ``final_ratio * lr`` at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if final_ratio is None:
        return lr
    p = (step - warmup) / max(1, total - warmup)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
