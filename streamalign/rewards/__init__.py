"""Rewards: registry, composite weighting, generic pixel rewards, external models. A world's own rewards
register themselves and are found through the ``streamalign.rewards`` entry points.

``Reward("sharpness")(videos, prompts) -> float32 [B]`` with videos [B, F, 3, H, W] in [0, 1];
``CompositeReward.parse("sharpness=1,smoothness=0.5")(videos, prompts) -> {name: [B], "composite": [B]}``.
"""

from . import pixel  # noqa: F401  (registers sharpness, smoothness)
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

__all__ = [
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
