"""CoPO (AR-CoPO, consistency-model form) in x0 space on the pivot chunk.

For anchor k (drawn from the G branches) and denoising step t of the pivot chunk:
``a = F_theta(x_t^k, ctx, t)``; ``d_i = mean((x0_old_i - a)^2)``; ``pi_theta(i) = softmax_i(-d_i / tau)``;
``pi_old`` the same with ``a_old = x0_old_k``; ``rho_i = pi_theta(i) / pi_old(i)``;
``loss = -mean_i min(A_i rho_i, A_i clip(rho_i, 1 - eps, 1 + eps))`` averaged over anchors and steps.
The adaptive tau is ``tau_scale x`` the median off-anchor distance of the old policy (so d/tau is O(1)).
Without the clip (``clip=False``) this is the off-policy ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...schemas.run import arg
from ..replay import PivotReplay
from .base import (
    ClippedRatio,
    GroupInput,
    GroupLoss,
    Objective,
    clipped_surrogate,
    group_advantages,
    group_rewards,
    register_objective,
)

LOG_RATIO_MAX = 20.0  # |log rho| is clamped here before exp (far outside any clip range)
TAU_MIN = 1e-6  # floor of the adaptive temperature (mean squared latent distance)


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean((b_i - a_k)^2)`` over the latent dims: a [K, S, *D], b [G, S, *D] -> [K, S, G]."""
    a2 = a.flatten(2)
    b2 = b.flatten(2)
    return (a2.unsqueeze(2) - b2.transpose(0, 1).unsqueeze(0)).pow(2).mean(-1)


def adaptive_tau(d_old: torch.Tensor, anchors: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale x median`` of the old policy's off-anchor distances d_old [K, S, G] (anchor k's own column
    excluded), detached; floored at TAU_MIN (branches closer than that are numerically identical)."""
    k, s, g = d_old.shape
    off = torch.ones(k, s, g, dtype=torch.bool)
    off[torch.arange(k), :, anchors] = False
    return (scale * d_old.detach()[off].median()).clamp(min=TAU_MIN)


def copo_terms(
    a: torch.Tensor,
    x0_old: torch.Tensor,
    anchors: torch.Tensor,
    adv: torch.Tensor,
    tau: float | torch.Tensor | None = None,
    eps: float = 1e-4,
    clip: bool = True,
    tau_scale: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CoPO loss for current predictions a [K, S, *D] at anchors [K] (indices into the G branches) and
    the S chosen steps; x0_old [G, S, *D] old predictions of every branch at those steps; adv [G]."""
    d = pairwise_sq_dist(a.float(), x0_old.float())  # [K, S, G]
    with torch.no_grad():
        d_old = pairwise_sq_dist(x0_old[anchors].float(), x0_old.float())
        t = adaptive_tau(d_old, anchors, tau_scale) if tau is None else torch.as_tensor(float(tau))
    logp = torch.log_softmax(-d / t, dim=-1)
    logp_old = torch.log_softmax(-d_old / t, dim=-1)
    rho = torch.exp((logp - logp_old).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))  # no inf * 0 = NaN
    loss, ratio_stats = clipped_surrogate(rho, adv.to(rho).view(1, 1, -1), eps, clip)
    return loss, {"tau": float(t), "d_over_tau": float((d_old / t).median()), **ratio_stats}


@dataclass
class CoPO(Objective):
    """The CoPO objective on stored (or fresh) fork groups. ``steps``: how many of the pivot's T denoising
    steps to use per group (None: all, else a random subset of that size)."""

    anchors: int = 4
    steps: int | None = None
    tau: float | None = None
    tau_scale: float = 1.0
    eps: float = 1e-4
    clip: bool = True
    name: str = "copo"
    stat_keys: tuple[str, ...] = (
        "tau", "d_over_tau", "ratio_dev_mean", "ratio_dev_max", "clip_frac", "reward", "reward_std", "zero_variance",
    )  # fmt: skip

    def check(self) -> None:
        if self.anchors < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("--anchors and --pivot-steps must be >= 1")
        if self.tau is not None and self.tau <= 0:
            raise ValueError(f"--tau {self.tau} must be > 0 (or omit it for the adaptive default)")
        if not 0 < self.eps < 1:
            raise ValueError(f"--clip-eps {self.eps} must lie in (0, 1)")

    def group_loss(self, group: GroupInput, policy: PivotReplay) -> GroupLoss:
        e = group.entry
        rewards, info = group_rewards(e)
        if info["zero_variance"]:  # no signal: skip the replay, contribute nothing
            return GroupLoss(torch.zeros(()), info)
        g, t = e.x_t.shape[:2]
        k = min(self.anchors, g)
        anchors = torch.randperm(g, generator=group.generator)[:k].sort().values
        steps = torch.arange(t)
        if self.steps is not None and self.steps < t:
            steps = torch.randperm(t, generator=group.generator)[: self.steps].sort().values
        x_t = e.x_t[anchors][:, steps].float()  # [K, S, c, C, H, W]
        pred = policy.predict(e, group.text, x_t.flatten(0, 1), steps.repeat(k))
        a = pred.view(k, len(steps), *pred.shape[1:])
        adv = group_advantages(rewards)
        loss, stats = copo_terms(
            a, e.x0_old[:, steps].to(a.device), anchors, adv.to(a.device), self.tau, self.eps, self.clip, self.tau_scale
        )
        return GroupLoss(loss, {**stats, **info})


@register_objective
class CoPOConfig(ClippedRatio):
    """CoPO (AR-CoPO): contrastive, distance-based GRPO on the pivot chunk."""

    name: Literal["copo"] = "copo"
    pivot_steps: int | None = arg(None, "Pivot denoising steps per group (default all).")
    tau: float | None = arg(None, "CoPO temperature (default adaptive).")
    tau_scale: float = arg(1.0, "Adaptive tau = scale x median old distance.")

    def build(self) -> CoPO:
        return CoPO(self.anchors, self.pivot_steps, self.tau, self.tau_scale, self.clip_eps, self.clip)
