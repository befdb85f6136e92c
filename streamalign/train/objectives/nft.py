"""NFT (Astrolabe / DiffusionNFT) on the pivot chunk, with uncertainty-aware selective KL and a dynamic
old / reference policy (DESIGN "Objectives").

For branch i with clean pivot latent x0_i and ``r~_i = clip(A_i / A_max, -1, 1) / 2 + 0.5``: a step t drawn
from the sampler's own (warped) schedule and fresh eps; ``x_t = (1 - s_t) x0 + s_t eps``; ``v* = eps - x0``;
``v+ = (1 - beta) v_old + beta v_theta``; ``v- = (1 + beta) v_old - beta v_theta``;
``loss = r~ |v+ - v*|^2 + (1 - r~) |v- - v*|^2 (+ kl_w |v_theta - v_ref|^2 on the selected samples)``.
Velocities come from x0 predictions: ``v = (x_t - x0_hat) / s_t`` (exact for flow and x0 models alike).

Selective KL: ``u_i = rank(primary)_i - mean_aux rank(aux)_i`` within the group; the KL term applies to the
top ``kappa`` fraction (rounded up) of the branches with ``u_i >= 0`` -- where the primary reward likes a
sample the auxiliary rewards do not (a likely hack). After every update kappa is multiplied by
KAPPA_STEP when the mean KL exceeded ``kl_target``, divided by it otherwise, and kept in
[kappa_min, kappa_max].

Old policy: ``theta_old <- d theta_old + (1 - d) theta`` after every update, ``d = min(decay_rate * step,
decay_max)``. Reference: reset to the current policy whenever the mean KL exceeds ``ref_reset_kl``. Both
live as copies of the LoRA weights (the base weights are frozen and shared) and are checkpointed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ...schemas.run import arg
from ..old_policy import loaded_weights
from ..replay import PivotReplay
from .base import GroupInput, GroupLoss, Objective, ObjectiveConfig, group_advantages, group_rewards, register_objective

KAPPA_STEP = 1.25


def nft_weights(adv: torch.Tensor, a_max: float = 5.0) -> torch.Tensor:
    """``r~ = clip(A / A_max, -1, 1) / 2 + 0.5`` in [0, 1]."""
    return (adv / a_max).clamp(-1.0, 1.0) / 2 + 0.5


def nft_terms(v_theta: torch.Tensor, v_old: torch.Tensor, v_star: torch.Tensor, r: torch.Tensor, beta: float):
    """Per-sample NFT loss [N] for velocities [N, ...] and weights r [N]."""
    dims = tuple(range(1, v_theta.dim()))
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    return r * (v_pos - v_star).pow(2).mean(dims) + (1 - r) * (v_neg - v_star).pow(2).mean(dims)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dim (0 = smallest; ties by position), float."""
    order = torch.sort(x, dim=-1, stable=True).indices
    return torch.sort(order, dim=-1, stable=True).indices.float()


def selective_kl_mask(primary: torch.Tensor, aux: torch.Tensor | None, kappa: float) -> torch.Tensor:
    """Boolean [G]: the top ceil(kappa * n) of the n branches with ``u = rank(primary) - mean rank(aux) >= 0``
    (largest u first, ties by position). primary [G]; aux [A, G] or None (a single reward: u is the primary
    rank minus the middle rank, so the KL guards the samples the reward likes most)."""
    rp = ranks(primary)
    u = rp - (ranks(aux).mean(0) if aux is not None and aux.numel() else (len(rp) - 1) / 2)
    cand = torch.nonzero(u >= 0).flatten()
    k = math.ceil(kappa * len(cand)) if len(cand) else 0
    order = cand[torch.sort(-u[cand], stable=True).indices][:k]
    mask = torch.zeros_like(primary, dtype=torch.bool)
    mask[order] = True
    return mask


def old_deviation(v_theta: torch.Tensor, v_old: torch.Tensor) -> float:
    """The largest relative distance ``|v_theta_i - v_old_i| / |v_old_i|`` (L2 over each sample [N, ...]) of
    the current from the old policy: NFT's counterpart of the ratio objectives' ratio_dev_max (0 while the
    two policies are the same: its old predictions are recomputed under the trainer's numerics)."""
    diff = (v_theta.double() - v_old.double()).flatten(1).norm(dim=1)
    return float((diff / v_old.double().flatten(1).norm(dim=1).clamp(min=1e-30)).max())


@dataclass
class NFT(Objective):
    beta: float = 0.1
    kl_w: float = 1e-4
    a_max: float = 5.0
    kappa: float = 0.1
    kappa_min: float = 0.02
    kappa_max: float = 0.2
    kl_target: float = 1e-3
    decay_rate: float = 1e-3
    decay_max: float = 0.5
    ref_reset_kl: float = 1.0
    primary: str | None = None  # primary reward name (default: the highest weight of the entry's composite)
    name: str = "nft"
    stat_keys: tuple[str, ...] = (
        "nft_loss", "kl", "kl_mask_rate", "kappa", "old_decay", "ref_resets", "old_dev_max", "reward", "reward_std",
        "adv_std", "zero_variance",
    )  # fmt: skip
    params: list[torch.nn.Parameter] = field(default_factory=list, repr=False)
    old: list[torch.Tensor] = field(default_factory=list, repr=False)
    ref: list[torch.Tensor] = field(default_factory=list, repr=False)
    ref_resets: int = 0
    last_decay: float = 0.0

    def check(self) -> None:
        if not 0 < self.beta <= 1:
            raise ValueError(f"--nft-beta {self.beta} must lie in (0, 1]")
        if self.kl_w < 0 or self.a_max <= 0:
            raise ValueError("--kl-w must be >= 0 and the advantage scale > 0")
        if not 0 < self.kappa_min <= self.kappa <= self.kappa_max <= 1:
            raise ValueError(f"kappa {self.kappa} must lie in [{self.kappa_min}, {self.kappa_max}] within (0, 1]")
        if not 0 <= self.decay_max < 1 or self.decay_rate < 0:
            raise ValueError("old-policy decay: rate >= 0 and max in [0, 1)")

    # -- policy copies -------------------------------------------------------------------------------
    def bind(self, params: list[torch.nn.Parameter]) -> None:
        """Start old and reference as copies of the trainable (LoRA) weights."""
        self.params = list(params)
        self.old = [p.detach().clone() for p in self.params]
        self.ref = [p.detach().clone() for p in self.params]

    def weights(self, values: list[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """Temporarily load `values` into the trainable parameters (no grad inside)."""
        return loaded_weights(self.params, values)

    def after_step(self, step: int, stats: dict[str, float]) -> None:
        """After update `step` (1-based): soft-update old, adapt kappa, maybe reset the reference."""
        d = self.last_decay = min(self.decay_rate * step, self.decay_max)
        with torch.no_grad():
            for o, p in zip(self.old, self.params, strict=True):
                o.mul_(d).add_(p.detach(), alpha=1 - d)
        kl = stats.get("kl", 0.0)
        k = self.kappa * (KAPPA_STEP if kl > self.kl_target else 1 / KAPPA_STEP)
        self.kappa = min(self.kappa_max, max(self.kappa_min, k))
        if kl > self.ref_reset_kl:
            self.ref = [p.detach().clone() for p in self.params]
            self.ref_resets += 1

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"old.{i}": t for i, t in enumerate(self.old)} | {f"ref.{i}": t for i, t in enumerate(self.ref)}
        return tensors, {"kappa": self.kappa, "ref_resets": self.ref_resets, "last_decay": self.last_decay}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.old = [tensors[f"old.{i}"].clone() for i in range(len(self.params))]
        self.ref = [tensors[f"ref.{i}"].clone() for i in range(len(self.params))]
        self.kappa, self.ref_resets = float(meta["kappa"]), int(meta["ref_resets"])
        self.last_decay = float(meta["last_decay"])

    # -- the loss ------------------------------------------------------------------------------------
    def draw(self, x0: torch.Tensor, sigmas: torch.Tensor, g: torch.Generator):
        """Step indices [G] from the sampler's schedule, x_t and v* for clean latents x0 [G, ...]."""
        steps = torch.randint(len(sigmas), (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        s = sigmas[steps].view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return steps, (1 - s) * x0 + s * eps, eps - x0, s

    def group_loss(self, group: GroupInput, policy: PivotReplay) -> GroupLoss:
        e = group.entry
        rewards, info = group_rewards(e)
        r = nft_weights(group_advantages(rewards), self.a_max)
        sigmas = torch.tensor(policy.sampler.schedule.sigmas, dtype=torch.float32)
        x0 = e.branch_latents[:, : e.chunk_frames].float()  # [G, c, C, H, W] the clean pivot chunks
        steps, x_t, v_star, s = self.draw(x0, sigmas, group.generator)
        dev = next(policy.sampler.model.parameters()).device
        x_t, v_star, s, r = x_t.to(dev), v_star.to(dev), s.to(dev), r.to(dev)

        def velocity(values: list[torch.Tensor] | None) -> torch.Tensor:
            with self.weights(values) if values is not None else contextlib.nullcontext():
                return (x_t - policy.predict(e, group.text, x_t, steps).float()) / s

        # old and reference first: swapping weights in place after the graph is built would corrupt it
        v_old = velocity(self.old)
        v_ref = velocity(self.ref) if self.kl_w > 0 else None
        v_theta = velocity(None)
        nft = nft_terms(v_theta, v_old, v_star, r, self.beta).mean()
        mask = selective_kl_mask(*self._ranked_rewards(e), self.kappa).to(dev)
        kl_all = torch.zeros(())
        loss = nft
        if v_ref is not None:
            kl_per = (v_theta - v_ref).pow(2).mean(tuple(range(1, v_theta.dim())))
            kl_all = kl_per.detach().mean()
            loss = nft + self.kl_w * (kl_per * mask).sum() / mask.numel()
        stats = {
            "nft_loss": float(nft.detach()),
            "kl": float(kl_all),
            "kl_mask_rate": float(mask.float().mean()),
            "kappa": self.kappa,
            "old_decay": self.last_decay,
            "ref_resets": float(self.ref_resets),
            "old_dev_max": old_deviation(v_theta.detach(), v_old),
        }
        return GroupLoss(loss, {**stats, **info})

    def _ranked_rewards(self, e) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = {k: w for k, w in e.reward_weights.items() if w != 0}
        primary = self.primary or max(weights, key=lambda k: (weights[k], -list(weights).index(k)))
        if primary not in e.rewards:
            raise ValueError(f"--primary-reward {primary!r} is not in the entry's rewards ({', '.join(e.rewards)})")
        aux = [e.rewards[k].double() for k in weights if k != primary]
        return e.rewards[primary].double(), torch.stack(aux) if aux else None


@register_objective
class NFTConfig(ObjectiveConfig):
    """NFT (Astrolabe / DiffusionNFT): negative-aware fine-tuning with selective KL and a dynamic reference."""

    name: Literal["nft"] = "nft"
    nft_beta: float = arg(0.1, "NFT v+/v- mixing beta.")
    kl_w: float = arg(1e-4, "NFT selective-KL weight.")
    kappa: float = arg(0.1, "NFT initial selective-KL fraction (adapts in [0.02, 0.2]).")
    kl_target: float = arg(1e-3, "NFT: kappa grows while the KL is above this.")
    ref_reset_kl: float = arg(1.0, "NFT: reset the reference when the KL exceeds this.")
    old_decay_rate: float = arg(1e-3, "NFT old policy: d = min(rate x step, max).")
    old_decay_max: float = arg(0.5, "NFT old policy: the cap of d.")
    primary_reward: str | None = arg(None, "NFT: primary reward (default: largest weight).")

    def build(self) -> NFT:
        return NFT(beta=self.nft_beta, kl_w=self.kl_w, kappa=self.kappa, kl_target=self.kl_target,
                   ref_reset_kl=self.ref_reset_kl, decay_rate=self.old_decay_rate, decay_max=self.old_decay_max,
                   primary=self.primary_reward)  # fmt: skip
