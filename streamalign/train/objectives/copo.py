"""CoPO (AR-CoPO, consistency-model form) in x0 space on the pivot chunk.

For anchor k (drawn from the G branches) and denoising step t of the pivot chunk:
``a = F_theta(x_t^k, ctx, t)``; ``d_i = mean((x0_old_i - a)^2)``; ``pi_theta(i) = softmax_i(-d_i / tau)``;
``pi_old`` the same with ``a_old`` the old policy's prediction of the anchor (``x0_old_k``, or recomputed under the
trainer's numerics: train/old_policy.py); ``rho_i = pi_theta(i) / pi_old(i)``;
``loss = -mean_i min(A_i rho_i, A_i clip(rho_i, 1 - eps, 1 + eps))`` averaged over anchors and steps.
The adaptive tau is ``tau_scale x`` the median off-anchor distance of the old policy, per denoising step
(``tau_mode="step"``, the default) or pooled over the steps (``"pooled"``), so d/tau is O(1). Per step
because the branches' spread shrinks along the trajectory: on the shapes world the median off-anchor
distance of a group falls from step 0 to its smallest step by ~26x (median of 16 groups; 1.5x to 4.7e4x),
so one pooled median leaves d/tau ~10 (up to ~500) at step 0, a near one-hot softmax whose ratios explode
for a small move of the prediction, and below 1 (down to 0.01: no signal) at the last step. Without the
clip (``clip=False``) this is the off-policy ablation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...schemas.run import arg
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

TAU_MODES = ("step", "pooled")
TAU_MIN = 1e-6  # floor of the adaptive temperature (mean squared latent distance)


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean((b_i - a_k)^2)`` over the latent dims: a [K, S, *D], b [G, S, *D] -> [K, S, G]."""
    a2 = a.flatten(2)
    b2 = b.flatten(2)
    return (a2.unsqueeze(2) - b2.transpose(0, 1).unsqueeze(0)).pow(2).mean(-1)


def adaptive_tau(d_old: torch.Tensor, anchors: torch.Tensor, scale: float = 1.0, mode: str = "pooled") -> torch.Tensor:
    """``scale x median`` of the old policy's off-anchor distances d_old [K, S, G] (anchor k's own column
    excluded), detached; floored at TAU_MIN (branches closer than that are numerically identical).
    ``pooled``: one median over every step, a scalar; ``step``: one per step s, shape [1, S, 1]."""
    k, s, g = d_old.shape
    off = torch.ones(k, s, g, dtype=torch.bool)
    off[torch.arange(k), :, anchors] = False
    if mode == "pooled":
        return (scale * d_old.detach()[off].median()).clamp(min=TAU_MIN)
    per_step = d_old.detach().transpose(0, 1)[off.transpose(0, 1)].view(s, -1)  # [S, K x (G - 1)]
    return (scale * per_step.median(dim=1).values).clamp(min=TAU_MIN).view(1, s, 1)


def copo_terms(
    a: torch.Tensor,
    x0_old: torch.Tensor,
    anchors: torch.Tensor,
    adv: torch.Tensor,
    tau: float | torch.Tensor | None = None,
    eps: float = 1e-4,
    clip: bool = True,
    tau_scale: float = 1.0,
    tau_mode: str = "pooled",
    a_old: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CoPO loss for current predictions a [K, S, *D] at anchors [K] (indices into the G branches) and
    the S chosen steps; x0_old [G, S, *D] old predictions of every branch at those steps; adv [G].
    `a_old` [K, S, *D]: the old policy's predictions at the anchors, recomputed under the trainer's numerics
    (default: the stored ``x0_old[anchors]``); pi_old's distances are measured from it.
    Stats: tau (the mean over steps of the adaptive tau), tau_spread (largest / smallest per-step tau;
    1 for a pooled or fixed tau), d_over_tau (median), categorical_kl (exact KL(pi_old || pi_theta) of
    the G-way softmaxes, mean over anchors and steps) and ``ratio_stats``."""
    d = pairwise_sq_dist(a.float(), x0_old.float())  # [K, S, G]
    with torch.no_grad():
        d_old = pairwise_sq_dist((x0_old[anchors] if a_old is None else a_old).float(), x0_old.float())
        t = adaptive_tau(d_old, anchors, tau_scale, tau_mode) if tau is None else torch.as_tensor(float(tau))
    logp = torch.log_softmax(-d / t, dim=-1)
    logp_old = torch.log_softmax(-d_old / t, dim=-1)
    adv = adv.to(logp).view(1, 1, -1)
    loss, ratio_stats = clipped_surrogate(logp - logp_old, adv, eps, clip)
    with torch.no_grad():
        lo, lt = logp_old.double(), logp.detach().double()
        kl = float((lo.exp() * (lo - lt)).sum(-1).mean())
    return loss, {"tau": float(t.mean()), "tau_spread": float(t.max() / t.min()),
                  "d_over_tau": float((d_old / t).median()), "categorical_kl": kl, **ratio_stats}  # fmt: skip


@dataclass
class CoPO(Objective):
    """The CoPO objective on stored (or fresh) fork groups. ``steps``: how many of the pivot's T denoising
    steps to use per group (None: all, else a random subset of that size)."""

    anchors: int = 4
    steps: int | None = None
    tau: float | None = None
    tau_scale: float = 10.0  # defaults chosen by `experiment sweep` (README "Experiments")
    eps: float = 0.2
    clip: bool = True
    tau_mode: str = "step"
    target_kl: float | None = None
    name: str = "copo"
    stat_keys: tuple[str, ...] = ("tau", "tau_spread", "d_over_tau", "categorical_kl", *RATIO_STATS, *REWARD_STATS)

    def check(self) -> None:
        if self.anchors < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("--anchors and --pivot-steps must be >= 1")
        if self.tau is not None and self.tau <= 0:
            raise ValueError(f"--tau {self.tau} must be > 0 (or omit it for the adaptive default)")
        if not 0 < self.eps < 1:
            raise ValueError(f"--clip-eps {self.eps} must lie in (0, 1)")
        if self.tau_mode not in TAU_MODES:
            raise ValueError(f"--tau-mode {self.tau_mode!r}: choose from {', '.join(TAU_MODES)}")
        if self.tau_scale <= 0:
            raise ValueError(f"--tau-scale {self.tau_scale} must be > 0")
        check_target_kl(self.target_kl)

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
        x_t = e.x_t[anchors][:, steps].float().flatten(0, 1)  # [K x S, c, C, H, W]
        old = policy.old_predict(e, group.text, x_t, steps.repeat(k), e.x0_old[anchors][:, steps].flatten(0, 1))
        pred = policy.predict(e, group.text, x_t, steps.repeat(k))
        a = pred.view(k, len(steps), *pred.shape[1:])
        a_old = (pred.detach() if old is None else old).view_as(a)
        adv = group_advantages(rewards)
        x0_old = e.x0_old[:, steps].to(a.device)
        loss, stats = copo_terms(a, x0_old, anchors, adv.to(a.device), self.tau, self.eps, self.clip, self.tau_scale,
                                 self.tau_mode, a_old)  # fmt: skip
        return GroupLoss(loss, {**stats, **info})


@register_objective
class CoPOConfig(ClippedRatio):
    """CoPO (AR-CoPO): contrastive, distance-based GRPO on the pivot chunk."""

    name: Literal["copo"] = "copo"
    pivot_steps: int | None = arg(None, "Pivot denoising steps per group (default all).")
    tau: float | None = arg(None, "CoPO temperature (default adaptive).")
    # chosen by `experiment sweep` on the shapes world: with tau-scale 1 and eps 1e-4 the clip fraction
    # stays at 0.99 after the first update; 10 and 0.2 keep it at 0.02-0.2 and gain more (README)
    clip_eps: float = arg(0.2, "Ratio clip epsilon (copo: 0.2, sde-grpo: 1e-4).")
    tau_scale: float = arg(10.0, "Adaptive tau = scale x median old distance.")
    tau_mode: Literal["step", "pooled"] = arg("step", "Adaptive tau: one median per denoising step | pooled.")

    def build(self) -> CoPO:
        return CoPO(self.anchors, self.pivot_steps, self.tau, self.tau_scale, self.clip_eps, self.clip, self.tau_mode,
                    self.target_kl)  # fmt: skip
