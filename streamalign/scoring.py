"""Paired scoring: every model generates the videos of the same (prompt, seed) pairs, so the noise is
identical and differences between models are paired; bootstrap confidence intervals of those differences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .pipeline import Pipeline
from .rewards import CompositeReward


@torch.no_grad()
def score_policy(
    policy: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    reward: CompositeReward,
    batch: int | None = None,
) -> dict[str, torch.Tensor]:
    """Every reward, metric and the composite of one video per (prompt, seed): name -> float32 [N] (CPU).
    Videos are generated and scored `batch` at a time (default: from the device memory, at most 64)."""
    batch = batch or policy.sampler.auto_batch(len(prompts))
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(prompts), batch):
        ps, ss = list(prompts[i : i + batch]), list(seeds[i : i + batch])
        for k, v in reward(policy.generate(ps, ss, batch), ps).items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def bootstrap_ci(diff: torch.Tensor, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired differences diff [N] (resampling pairs)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (n_boot, len(diff)), generator=g)
    means = diff.double()[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def paired_differences(
    base: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per metric: base mean, model mean, mean paired difference and its 95% bootstrap interval."""
    out = {}
    for k in base:
        d = other[k].double() - base[k].double()
        lo, hi = bootstrap_ci(d, n_boot, seed)
        out[k] = {"base": float(base[k].mean()), "model": float(other[k].mean()), "diff": float(d.mean()),
                  "ci_low": lo, "ci_high": hi}  # fmt: skip
    return out
