"""The built-in shapes world: prompt grammar, renderer, its rewards and OOD metrics, the shipped generator's
weights, their pre-training and self-distillation, sample quality. Its model configs are the presets ``shapes``,
``shapes-long`` and ``shapes-distilled``."""

from .world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT_PAIRS,
    SHAPES,
    SHIPPED_WEIGHTS,
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
    "all_prompts",
    "held_in_prompts",
    "held_out_prompts",
    "parse_prompt",
    "render",
    "sample_videos",
]
