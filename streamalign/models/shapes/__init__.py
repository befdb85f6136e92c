"""The built-in shapes world: prompt grammar, renderer, the shipped generator and its pre-training."""

from .pipeline import SHIPPED_WEIGHTS, ShapesWorld
from .world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT_PAIRS,
    SHAPES,
    ShapePrompt,
    all_prompts,
    held_in_prompts,
    held_out_prompts,
    parse_prompt,
    render,
    sample_videos,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "DIRECTIONS",
    "HELD_OUT_PAIRS",
    "SHAPES",
    "SHIPPED_WEIGHTS",
    "ShapePrompt",
    "ShapesWorld",
    "all_prompts",
    "held_in_prompts",
    "held_out_prompts",
    "parse_prompt",
    "render",
    "sample_videos",
]
