"""SDE-GRPO baseline (Flow-GRPO / DanceGRPO style) on the same few-step sampler.

Each re-noise of the pivot chunk is read as a Gaussian policy ``x_{k+1} ~ N((1 - s_{k+1}) x0_theta(x_k),
s_{k+1}^2 I)``; its log-prob under the current and the old (stored ``x0_old``) prediction gives the ratio,
and the loss is PPO-clip with group-normalised advantages, averaged over anchors and transitions. Groups
for it are best collected with ``--fork solver`` (same initial noise, different re-noising). The AR-CoPO
paper expects it to fail on near-deterministic few-step samplers: the log-ratio over ~10^4 dimensions is
huge for any visible change of x0 -- a measurement here, not an assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..replay import PivotReplay
from .base import (
    RATIO_STATS,
    REWARD_STATS,
    ClippedRatio,
    GroupInput,
    GroupLoss,
    Objective,
    check_target_kl,
    clipped_surrogate,
    group_advantages,
    group_rewards,
    register_objective,
)


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over all dims but the first: x, mean [N, ...], std [N] -> [N]."""
    dims = tuple(range(1, x.dim()))
    d = math.prod(x.shape[1:])
    var = std.double().pow(2).view(-1, *([1] * (x.dim() - 1)))
    sq = ((x.double() - mean.double()).pow(2) / var).sum(dims)
    return -0.5 * sq - d * std.double().log() - 0.5 * d * math.log(2 * math.pi)


@dataclass
class SDEGRPO(Objective):
    anchors: int = 4  # branches replayed per group
    eps: float = 1e-4  # PPO ratio clip (Flow-GRPO's default clip range)
    clip: bool = True
    target_kl: float | None = None
    name: str = "sde-grpo"
    fork = "solver"  # its groups share the pivot's initial noise and differ in the re-noising
    stat_keys: tuple[str, ...] = ("log_ratio_abs_mean", *RATIO_STATS, *REWARD_STATS)

    def check(self) -> None:
        if self.anchors < 1 or not 0 < self.eps < 1:
            raise ValueError("--anchors must be >= 1 and --clip-eps in (0, 1)")
        check_target_kl(self.target_kl)

    def group_loss(self, group: GroupInput, policy: PivotReplay) -> GroupLoss:
        e = group.entry
        rewards, info = group_rewards(e)
        if info["zero_variance"]:
            return GroupLoss(torch.zeros(()), info)
        g, t = e.x_t.shape[:2]
        if t < 2:
            raise ValueError("SDE-GRPO needs a sampler with >= 2 denoising steps (it scores the re-noising)")
        k = min(self.anchors, g)
        branches = torch.randperm(g, generator=group.generator)[:k].sort().values
        steps = torch.arange(t - 1)
        x_in = e.x_t[branches][:, :-1].float()  # [K, T-1, c, C, H, W]
        x_next = e.x_t[branches][:, 1:].float()
        rows = (e, group.text, x_in.flatten(0, 1), steps.repeat(k))
        old = policy.old_predict(*rows, e.x0_old[branches][:, :-1].flatten(0, 1))
        x0 = policy.predict(*rows).float()
        x0_old = x0.detach() if old is None else old.float()
        dev = x0.device
        s_next = torch.tensor(policy.sampler.schedule.sigmas, dtype=torch.float64)[1:].repeat(k).to(dev)
        nxt = x_next.flatten(0, 1).to(dev)
        mean = (1 - s_next).view(-1, *([1] * (x0.dim() - 1))).float()
        logp = gaussian_logprob(nxt, mean * x0, s_next)
        logp_old = gaussian_logprob(nxt, mean * x0_old.to(dev), s_next)
        adv = group_advantages(rewards)[branches].repeat_interleave(t - 1).to(dev)
        loss, ratio_stats = clipped_surrogate(logp - logp_old, adv, self.eps, self.clip)
        stats = {"log_ratio_abs_mean": float((logp - logp_old).detach().abs().mean()), **ratio_stats}
        return GroupLoss(loss, {**stats, **info})


@register_objective
class SDEGRPOConfig(ClippedRatio):
    """SDE-GRPO baseline: each re-noise a Gaussian policy, PPO clip on its log-prob (solver forks)."""

    name: Literal["sde-grpo"] = "sde-grpo"

    def build(self) -> SDEGRPO:
        return SDEGRPO(self.anchors, self.clip_eps, self.clip, self.target_kl)
