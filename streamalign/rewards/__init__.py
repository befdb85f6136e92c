"""Rewards: registry, composite weighting, the shapes world's rewards and OOD metrics, external models.

``Reward("colour_match")(videos, prompts) -> float32 [B]`` with videos [B, F, 3, H, W] in [0, 1];
``CompositeReward.parse(SHAPES_REWARDS, SHAPES_METRICS)(videos, prompts) -> {name: [B], "composite": [B]}``.
"""

from .external import load_external, register_external
from .registry import (
    CompositeReward,
    Reward,
    RewardError,
    RewardSpec,
    available,
    composite,
    get_spec,
    parse_term,
    register,
    to_grayscale,
)
from .shapes import SHAPES_METRICS, SHAPES_REWARDS

__all__ = [
    "SHAPES_METRICS",
    "SHAPES_REWARDS",
    "CompositeReward",
    "Reward",
    "RewardError",
    "RewardSpec",
    "available",
    "composite",
    "get_spec",
    "load_external",
    "parse_term",
    "register",
    "register_external",
    "to_grayscale",
]
