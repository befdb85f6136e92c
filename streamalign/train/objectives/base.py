"""The one objective interface every training loop uses.

An objective turns ONE fork group (a buffer entry, or a fresh group written the same way) into a loss
and logged statistics, given the current policy's pivot-chunk replay. Loops average group losses over
the (global) batch, so an objective never sees how groups are batched or sharded across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pydantic import model_validator

from ...registry import Registry
from ...rewards import composite
from ...schemas.buffer import Entry
from ...schemas.run import Section, arg
from ..replay import PivotReplay

ADV_EPS = 1e-6  # the advantage's std guard: A = (r - mean) / (std + 1e-6)
ZERO_STD = 1e-8  # a group whose composite std is below this carries no signal
# |log rho| is clamped here before exp in every ratio objective. Not a trust region (that is the clip,
# |log rho| <= log(1 + eps), and --target-kl): a numerical guard. exp(20) = 4.9e8 keeps A * rho, its sum over
# the G x anchors x steps terms and the backward pass finite in float32 (overflow at exp(88.7)), and keeps
# inf * 0 = NaN out of the loss when A = 0; a log-ratio beyond it gets no gradient (clamp). 20 rather than
# the 10 of the public Neighbor-GRPO code: at 10 the clamp would bite already at ratio 2.2e4, which the
# shapes runs reach (ratio_dev_max up to 1.6e8 at lr 1e-4), hiding how far outside the trust region they are.
LOG_RATIO_MAX = 20.0
QUANTILES = (0.5, 0.9, 0.99)  # of |log rho|, logged per group as log_ratio_p50 / _p90 / _p99
RATIO_STATS = ("approx_kl", "log_ratio_p50", "log_ratio_p90", "log_ratio_p99", "ratio_dev_mean", "ratio_dev_max",
               "clip_frac")  # fmt: skip
REWARD_STATS = ("reward", "reward_std", "adv_std", "zero_variance")


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


class Objective:
    """The protocol every objective follows; the defaults are those of a stateless objective.

    ``fork``: how its on-policy fork groups are collected (``initial``: branches differ in the pivot's
    initial noise; ``solver``: in its re-noising). ``bind`` receives the trainable parameters once,
    ``after_step`` runs after every optimizer step with the rank-averaged statistics, and ``state_dict``
    (tensors, JSON meta) is checkpointed when not None."""

    name: str
    stat_keys: tuple[str, ...]  # every statistic group_loss may report (reduced over ranks by name)
    fork = "initial"
    target_kl: float | None = None  # on-policy: an iteration's updates stop once approx_kl passes this

    def group_loss(self, group: GroupInput, policy: PivotReplay) -> GroupLoss:
        raise NotImplementedError

    def bind(self, params: list[torch.nn.Parameter]) -> None:
        return None

    def after_step(self, step: int, stats: dict[str, float]) -> None:
        return None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        return None

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        return None


class ObjectiveConfig(Section):
    """An objective's settings; subclasses set ``name`` (a Literal: the union key) and ``build``."""

    def build(self) -> Objective:
        raise NotImplementedError

    @model_validator(mode="after")
    def _valid(self) -> ObjectiveConfig:
        self.build().check()
        return self


class ClippedRatio(ObjectiveConfig):
    """Settings shared by the ratio-clipped objectives (CoPO, SDE-GRPO)."""

    anchors: int = arg(4, "Anchors (CoPO) or replayed branches (SDE-GRPO) per group.")
    clip_eps: float = arg(1e-4, "Ratio clip epsilon (copo: 0.2, sde-grpo: 1e-4).")
    clip: bool = arg(True, "The ratio clip; --no-clip is the off-policy ablation.", flag="--clip/--no-clip")
    target_kl: float | None = arg(None, "On-policy: stop an iteration's updates once approx KL (k3) passes this.")


def check_target_kl(target_kl: float | None) -> None:
    if target_kl is not None and not target_kl > 0:
        raise ValueError(f"--target-kl {target_kl} must be > 0 (or omit it: no early stop)")


OBJECTIVES: Registry[type[ObjectiveConfig]] = Registry("objectives", "objective")


def register_objective(config: type[ObjectiveConfig]) -> type[ObjectiveConfig]:
    """Make an objective selectable by its name (``--objective NAME``, ``objective: {name: NAME}``); a
    plug-in package's module is found through the entry-point group ``streamalign.objectives``."""
    return OBJECTIVES.register(config.model_fields["name"].default, config)


def composite_rewards(entry: Entry) -> torch.Tensor:
    """Composite reward [G] (float64) under the entry's weights (replaced at read time by ``--reward-weights``)."""
    return composite(entry.rewards, entry.reward_weights, torch.float64)


def group_rewards(entry: Entry) -> tuple[torch.Tensor, dict[str, float]]:
    """Composite rewards [G] and their logged statistics: reward (mean), reward_std (population), adv_std
    (population std of the normalised advantages: ~1, less where the 1e-6 guard dominates a tiny std) and
    zero_variance (1.0 when the std is below ZERO_STD: a group with no signal)."""
    rewards = composite_rewards(entry)
    std = float(rewards.std(unbiased=False))
    adv_std = float(group_advantages(rewards).double().std(unbiased=False))
    return rewards, {"reward": float(rewards.mean()), "reward_std": std, "adv_std": adv_std,
                     "zero_variance": float(std < ZERO_STD)}  # fmt: skip


def ratio_stats(log_ratio: torch.Tensor, eps: float, clip: bool) -> dict[str, float]:
    """Trust-region statistics of (clamped) log-ratios ``log rho`` (any shape), in float64:
    approx_kl: the k3 estimator ``mean((rho - 1) - log rho)`` (Schulman, "Approximating KL divergence"):
    unbiased for KL(old || theta) when the ratios' samples come from the old policy, never negative;
    log_ratio_p50/_p90/_p99: quantiles of |log rho|; ratio_dev_mean/_max: of |rho - 1|; clip_frac: share
    of ratios outside [1 - eps, 1 + eps] (0 without the clip)."""
    lr = log_ratio.detach().double().flatten()
    dev = torch.expm1(lr).abs()
    q = torch.quantile(lr.abs(), torch.tensor(QUANTILES, dtype=torch.float64))
    return {
        "approx_kl": float((torch.expm1(lr) - lr).mean()),
        **{f"log_ratio_p{round(100 * p)}": float(v) for p, v in zip(QUANTILES, q, strict=True)},
        "ratio_dev_mean": float(dev.mean()),
        "ratio_dev_max": float(dev.max()),
        "clip_frac": float((dev > eps).double().mean()) if clip else 0.0,
    }


def clipped_surrogate(
    log_ratio: torch.Tensor, adv: torch.Tensor, eps: float, clip: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO loss ``-mean min(A rho, A clip(rho, 1 - eps, 1 + eps))`` (``-mean A rho`` without the clip) for
    log-ratios (clamped here to +-LOG_RATIO_MAX, then ``rho = exp``, float32) and advantages adv
    broadcastable to them; stats: ``ratio_stats``."""
    log_ratio = log_ratio.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    rho = torch.exp(log_ratio).float()
    surrogate = adv * rho
    if clip:
        surrogate = torch.minimum(surrogate, adv * rho.clamp(1 - eps, 1 + eps))
    return -surrogate.mean(), ratio_stats(log_ratio, eps, clip)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``A_i = (r_i - mean) / (std + 1e-6)`` over the group [G] (population std), float32."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + ADV_EPS)).float()
