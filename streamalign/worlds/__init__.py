"""Built-in worlds: procedural text-to-video worlds with their own prompts, rewards and shipped generator,
so every stage runs on a CPU in minutes. A model config names its world (``world: shapes``); a stage
takes its default prompt sets and rewards from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Registry
from ..schemas.config import ModelConfig
from . import shapes
from .shapes.rewards import SHAPES_METRICS, SHAPES_REWARDS


@dataclass(frozen=True)
class World:
    name: str
    rewards: str  # the default composite, ``name=weight,...``
    metrics: str  # the default out-of-domain metrics
    prompt_sets: dict[str, Callable[[], tuple[str, ...]]]  # e.g. held-in / held-out
    ood_metric: str  # the out-of-domain metric of merge's dual criterion


# worlds by name (plug-ins: entry-point group ``streamalign.worlds``, see streamalign/registry.py)
WORLDS: Registry[World] = Registry("worlds", "world")


def register_world(world: World) -> World:
    """Make `world` the one a model config's ``world: NAME`` names (its prompts, rewards and metrics)."""
    return WORLDS.register(world.name, world)


register_world(World(
    "shapes", SHAPES_REWARDS, SHAPES_METRICS,
    {"held-in": lambda: tuple(p.text for p in shapes.held_in_prompts()),
     "held-out": lambda: tuple(p.text for p in shapes.held_out_prompts())},
    "background_cleanliness",
))  # fmt: skip


def get_world(name: str | None) -> World | None:
    return None if name is None else WORLDS.get(name)


def default_prompts(model: ModelConfig, prompts: tuple[str, ...] | None, which: str = "held-in") -> tuple[str, ...]:
    """`prompts` when given, else the model's world's prompt set `which`; a clear error for neither."""
    if prompts:
        return tuple(prompts)
    world = get_world(model.world)
    if world is None:
        raise ValueError(f"config {model.name!r} has no built-in world: give --prompts FILE (one prompt per line)")
    return world.prompt_sets[which]()


def default_rewards(model: ModelConfig, rewards: str | None, metrics: str | None) -> tuple[str, str]:
    """(rewards, metrics): the given ones, else the world's (its metrics only when no rewards are given)."""
    if rewards:
        return rewards, metrics or ""
    world = get_world(model.world)
    if world is None:
        raise ValueError(f"config {model.name!r} has no built-in world: give --rewards name=weight,...")
    return world.rewards, metrics or world.metrics


def default_ood_metric(model: ModelConfig, given: str | None) -> str:
    """The OOD metric of merge's dual criterion: the given one, else the model's world's; one line for
    neither (asked before anything loads)."""
    if given:
        return given
    world = get_world(model.world)
    if world is None:
        raise ValueError(f"config {model.name!r} has no built-in world: give --ood-metric NAME (a scored reward "
                         "or --metrics entry, or vbench:<dimension> with --ood-results)")  # fmt: skip
    return world.ood_metric
