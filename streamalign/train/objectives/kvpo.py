"""KVPO (Richard-Zhang-AI/KVPO@7703196, ``models/longlive/trainer/kvpo.py``) on KV-routed fork groups.

A group (``collect --fork kv-routing``) holds the anchor (row 0, the usual rollout) and K routed
branches (rows 1..K). Per branch k and pivot step s the Trajectory-Velocity-Energy score is
``e_ks = -mean((x0_old_ks - F(x_t_ks))^2) / (2 max(sigma_s, floor)^2)``, F the policy's x0 prediction
under the unrouted (deployment-time) context; ``score_k = sum_s e_ks``, and the branch probabilities are
``pi(k) = softmax_k(score_k)`` (Gibbs form). pi_theta uses the current policy (gradients through the first
`grad_steps` steps only), pi_old the rollout policy (its unrouted predictions are stored with the group,
``x0_unrouted``), so the update is the same on-policy and from a stale buffer.

Advantage: per reward component ``(r_k - r_anchor) / (std(r_1..r_K, r_anchor) + 1e-8)`` (sample std, as
the repo), weighted by the reward weights and summed; for the global rewards (the post-fork video) and the
local ones (the perturbed chunks, ``local.NAME``) each, fused by ``"std"`` (each divided by its population
std when above 1e-8) as ``w_local A_local + w_global A_global``, clipped at ``adv_clip``. Loss:
``scale * (-mean_k min(rho_k A_k, clip(rho_k, 1 - low, 1 + high) A_k) + kl_coef KL(pi_theta || pi_old))``,
``rho_k = pi_theta(k) / pi_old(k)``; the anchor slot ``scale = 1 - softmax([log pi_theta, a])_anchor`` with
``a = -inf`` when some branch beats the anchor (global or local composite), else 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...rewards import composite
from ...schemas.buffer import LOCAL_REWARD_PREFIX, Entry
from ...schemas.run import arg
from ..replay import PivotReplay
from .base import (
    LOG_RATIO_MAX,
    RATIO_STATS,
    REWARD_STATS,
    GroupInput,
    GroupLoss,
    Objective,
    ObjectiveConfig,
    group_rewards,
    ratio_stats,
    register_objective,
)

ANCHOR_EPS = 1e-8  # the repo's guard of the anchor advantage's std and of the fusion's std
FUSION_MODES = ("none", "std", "zscore")


def anchor_advantage(branch: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """``(r_k - r_anchor) / (std([r_1..r_K, r_anchor]) + 1e-8)`` [K] (sample std, float64)."""
    allr = torch.cat([branch.double(), anchor.double().view(1)])
    return (branch.double() - anchor.double()) / (allr.std() + ANCHOR_EPS)


def component_advantage(rewards: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum_i w_i anchor_advantage(r_i)`` over the reward components, rows [G] with the anchor first -> [K]."""
    return sum(float(w) * anchor_advantage(rewards[k][1:], rewards[k][0]) for k, w in weights.items())


def fuse(adv: torch.Tensor, mode: str) -> torch.Tensor:
    """The repo's per-signal normalisation before fusion: none | std (divide by the population std) |
    zscore (subtract the mean too); a std at or below 1e-8 leaves the scale alone."""
    if mode == "none":
        return adv
    std = adv.std(unbiased=False)
    centred = adv - adv.mean() if mode == "zscore" else adv
    return centred if std <= ANCHOR_EPS else centred / (std + ANCHOR_EPS)


def tve_scores(x0_target: torch.Tensor, x0_pred: torch.Tensor, sigmas: torch.Tensor, floor: float) -> torch.Tensor:
    """Trajectory-Velocity-Energy scores [K]: ``sum_s -mean((target - pred)^2) / (2 max(sigma_s, floor)^2)``
    for predictions x0_pred and targets [K, S, *D], noise levels sigmas [S]."""
    mse = (x0_target.float() - x0_pred.float()).pow(2).flatten(2).mean(-1)  # [K, S]
    scale = 2.0 * sigmas.double().clamp(min=floor).pow(2).clamp(min=1e-10)
    return -(mse.double() / scale.to(mse.device)).sum(-1)


def kvpo_loss(
    score: torch.Tensor,
    score_old: torch.Tensor,
    adv: torch.Tensor,
    safe: bool,
    low: float,
    high: float,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The KVPO loss from branch scores [K] (current, differentiable; old) and fused advantages [K]."""
    logp = torch.log_softmax(score, 0)
    logp_old = torch.log_softmax(score_old.detach(), 0)
    log_ratio = (logp - logp_old).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    rho = log_ratio.exp()
    adv = adv.to(rho)
    surrogate = torch.minimum(rho * adv, rho.clamp(1 - low, 1 + high) * adv)
    anchor_logit = torch.full((1,), float("-inf") if safe else 0.0, dtype=logp.dtype, device=logp.device)
    pi_anchor = torch.softmax(torch.cat([logp, anchor_logit]), 0)[-1]
    kl = (logp.exp() * (logp - logp_old)).sum()
    loss = (1 - pi_anchor) * (-surrogate.mean() + kl_coef * kl)
    with torch.no_grad():
        clipped = ((rho < 1 - low) | (rho > 1 + high)).double().mean()
    stats = {**ratio_stats(log_ratio, high, True), "clip_frac": float(clipped), "pi_anchor": float(pi_anchor.detach()),
             "branch_kl": float(kl.detach()), "safe": float(safe)}  # fmt: skip
    return loss.float(), stats


@dataclass
class KVPO(Objective):
    """KVPO on KV-routed groups (module docstring); the defaults are configs/train_kvpo_longlive.yaml's."""

    clip_low: float = 0.1
    clip_high: float = 0.2
    adv_clip: float = 2.5
    kl_coef: float = 10.0
    local_weight: float = 1.0
    global_weight: float = 0.5
    fusion: str = "std"
    grad_steps: int = 2
    sigma_floor: float = 1.0
    name: str = "kvpo"
    fork = "kv-routing"
    stat_keys: tuple[str, ...] = ("pi_anchor", "branch_kl", "safe", "adv_fused_std", *RATIO_STATS, *REWARD_STATS)

    def check(self) -> None:
        if not (0 < self.clip_low < 1 and self.clip_high > 0):
            raise ValueError(f"--kvpo-clip-low {self.clip_low} must lie in (0, 1) and --kvpo-clip-high > 0")
        if self.adv_clip < 0 or self.kl_coef < 0 or self.grad_steps < 0 or self.sigma_floor < 0:
            raise ValueError("--kvpo-adv-clip, --kvpo-kl, --kvpo-grad-steps and --kvpo-sigma-floor must be >= 0")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"--kvpo-fusion {self.fusion!r}: choose from {', '.join(FUSION_MODES)}")

    def advantages(self, e: Entry) -> tuple[torch.Tensor, bool]:
        """Fused, clipped advantages [K] (float32) of the branches and whether some branch beats the anchor."""
        w = e.reward_weights
        local = {k: e.rewards[LOCAL_REWARD_PREFIX + k] for k in w if LOCAL_REWARD_PREFIX + k in e.rewards}
        signals = [(self.global_weight, e.rewards)]
        if len(local) == len(w) and self.local_weight:
            signals.append((self.local_weight, local))
        fused, safe = 0.0, False
        for weight, rewards in signals:
            fused = fused + weight * fuse(component_advantage(rewards, w), self.fusion)
            total = composite(rewards, w, torch.float64)
            safe = safe or bool((total[1:] > total[0]).any())
        if self.adv_clip > 0:
            fused = fused.clamp(-self.adv_clip, self.adv_clip)
        return fused.float(), safe

    def group_loss(self, group: GroupInput, policy: PivotReplay) -> GroupLoss:
        e = group.entry
        if e.routing is None:
            raise ValueError(f"--objective kvpo needs KV-routed groups (collect --fork kv-routing); "
                             f"entry {e.entry_id} is not one")  # fmt: skip
        _, info = group_rewards(e)
        if info["zero_variance"]:
            return GroupLoss(torch.zeros(()), info)
        adv, safe = self.advantages(e)
        k, t = e.x_t.shape[0] - 1, e.x_t.shape[1]
        sigmas = torch.tensor(policy.sampler.schedule.sigmas, dtype=torch.float64)
        cache = policy.prefix(e, group.text)
        g = min(self.grad_steps, t)
        preds = []
        for lo, hi, grad in ((0, g, True), (g, t, False)):
            if hi <= lo:
                continue
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                x = e.x_t[1:, lo:hi].float().flatten(0, 1)
                steps = torch.arange(lo, hi).repeat(k)
                preds.append(policy.predict(e, group.text, x, steps, cache).view(k, hi - lo, *x.shape[1:]))
        pred = torch.cat(preds, 1)
        dev = pred.device
        score = tve_scores(e.x0_old[1:].to(dev), pred, sigmas, self.sigma_floor)
        score_old = tve_scores(e.x0_old[1:].to(dev), e.x0_unrouted[1:].to(dev), sigmas, self.sigma_floor)
        loss, stats = kvpo_loss(score, score_old, adv.to(dev), safe, self.clip_low, self.clip_high, self.kl_coef)
        return GroupLoss(loss, {**stats, "adv_fused_std": float(adv.double().std(unbiased=False)), **info})


@register_objective
class KVPOConfig(ObjectiveConfig):
    """KVPO: KV-routed branches, trajectory-energy branch probabilities, anchor-relative PPO."""

    name: Literal["kvpo"] = "kvpo"
    kvpo_clip_low: float = arg(0.1, "KVPO ratio clip below: rho >= 1 - this (repo yaml clip_range_low).")
    kvpo_clip_high: float = arg(0.2, "KVPO ratio clip above: rho <= 1 + this (repo yaml clip_range_high).")
    kvpo_adv_clip: float = arg(2.5, "KVPO: clamp the fused advantages at +-this (0: off; repo yaml adv_clip_max).")
    kvpo_kl: float = arg(10.0, "KVPO: weight of KL(pi_theta || pi_old) over the branch softmax (repo kl_coef).")
    kvpo_local_weight: float = arg(1.0, "KVPO: weight of the local (perturbed chunks) advantage.")
    kvpo_global_weight: float = arg(0.5, "KVPO: weight of the global (post-fork video) advantage.")
    kvpo_fusion: Literal["none", "std", "zscore"] = arg("std", "KVPO advantage fusion normalisation.")
    kvpo_grad_steps: int = arg(2, "KVPO: pivot steps whose replay carries gradient (repo log_prob_grad_steps).")
    kvpo_sigma_floor: float = arg(1.0, "KVPO: TVE score divides by 2 max(sigma, this)^2 (repo log_prob_sigma_floor).")

    def build(self) -> KVPO:
        return KVPO(self.kvpo_clip_low, self.kvpo_clip_high, self.kvpo_adv_clip, self.kvpo_kl, self.kvpo_local_weight,
                    self.kvpo_global_weight, self.kvpo_fusion, self.kvpo_grad_steps, self.kvpo_sigma_floor)  # fmt: skip
