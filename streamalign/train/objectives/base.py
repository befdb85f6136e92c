"""The one objective interface every training loop uses.

An objective turns ONE fork group (a buffer entry, or a fresh group written the same way) into a loss
and logged statistics, given the current policy's pivot-chunk replay. Loops average group losses over
the (global) batch, so an objective never sees how groups are batched or sharded across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ...schemas.buffer import Entry
from ..replay import PivotReplay

ADV_EPS = 1e-6  # the advantage's std guard: A = (r - mean) / (std + 1e-6)
ZERO_STD = 1e-8  # a group whose composite std is below this carries no signal


@dataclass
class GroupLoss:
    """A group's loss (scalar, differentiable) and its statistics (floats; averaged by the loop)."""

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class GroupInput:
    """What an objective gets for one group: the entry, its encoded prompt [1, L, D], and a generator
    seeded from (run seed, step, group) for any random choice it makes (anchors, step subsets)."""

    entry: Entry
    text: torch.Tensor
    generator: torch.Generator


class Objective(Protocol):
    name: str
    stat_keys: tuple[str, ...]  # every statistic group_loss may report (reduced over ranks by name)

    def group_loss(self, group: GroupInput, policy: PivotReplay) -> GroupLoss: ...


def composite_rewards(entry: Entry) -> torch.Tensor:
    """Composite reward [G] under the entry's weights (replaced at read time by ``--reward-weights``)."""
    total = torch.zeros(entry.group_size, dtype=torch.float64)
    for name, w in entry.reward_weights.items():
        total += w * entry.rewards[name].double()
    return total


def group_rewards(entry: Entry) -> tuple[torch.Tensor, dict[str, float]]:
    """Composite rewards [G] and their logged statistics: reward (mean), reward_std (population) and
    zero_variance (1.0 when the std is below ZERO_STD: a group with no signal)."""
    rewards = composite_rewards(entry)
    std = float(rewards.std(unbiased=False))
    return rewards, {"reward": float(rewards.mean()), "reward_std": std, "zero_variance": float(std < ZERO_STD)}


def clipped_surrogate(
    rho: torch.Tensor, adv: torch.Tensor, eps: float, clip: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO loss ``-mean min(A rho, A clip(rho, 1 - eps, 1 + eps))`` (``-mean A rho`` without the clip) for
    ratios rho and advantages adv broadcastable to them; stats: ratio_dev_mean / _max (|rho - 1|) and
    clip_frac (share of ratios outside the clip range; 0 without the clip)."""
    surrogate = adv * rho
    if clip:
        surrogate = torch.minimum(surrogate, adv * rho.clamp(1 - eps, 1 + eps))
    with torch.no_grad():
        dev = (rho - 1).abs()
        stats = {
            "ratio_dev_mean": float(dev.mean()),
            "ratio_dev_max": float(dev.max()),
            "clip_frac": float((dev > eps).float().mean()) if clip else 0.0,
        }
    return -surrogate.mean(), stats


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``A_i = (r_i - mean) / (std + 1e-6)`` over the group [G] (population std), float32."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + ADV_EPS)).float()
