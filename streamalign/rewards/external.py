"""External reward models (HPSv3, VideoAlign, CLIP, ...) plugged in from the user's own code and weights.

A plug-in is a factory ``factory(path, **kwargs) -> scorer`` where ``path`` is the local folder or file of
the reward model's weights and ``scorer(videos, prompts)`` takes videos ``[B, F, 3, H, W]`` in [0, 1] and
a list of prompt strings and returns ``[B]`` (whole videos) or ``[B, F]`` (frames; ``frame_level=True``).
The factory is named as ``"package.module:factory"`` or ``"/path/to/file.py:factory"``. Nothing is
downloaded: the factory loads from ``path`` (e.g. ``from_pretrained(path, local_files_only=True)``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from .registry import RewardError, RewardSpec, register


def load_external(target: str, path: str | Path | None = None, **kwargs) -> Callable:
    """Import the factory named by `target` and return ``factory(path, **kwargs)``."""
    if path is not None and not Path(path).exists():
        raise RewardError(f"external reward '{target}': model path {path} does not exist (give a local path)")
    factory = import_factory(target)
    return factory(path, **kwargs) if path is not None else factory(**kwargs)


@functools.cache
def import_factory(target: str) -> Callable:
    """The callable named ``package.module:factory`` or ``/path/file.py:factory`` (imported once)."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"external reward '{target}': expected 'package.module:factory' or 'file.py:factory'")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise RewardError(f"external reward '{target}': file {file} not found")
        spec = importlib.util.spec_from_file_location(f"streamalign_external_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"external reward '{target}': cannot import {module_name}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise RewardError(f"external reward '{target}': {module_name} has no callable '{attr}'")
    return factory


def register_external(
    name: str,
    target: str,
    path: str | Path | None = None,
    frame_level: bool = False,
    ood: bool = False,
    description: str = "",
    **kwargs,
) -> RewardSpec:
    """Load a plug-in and register it under `name`; it is then usable like a built-in
    (``Reward(name)``, composite terms ``name=weight``)."""
    scorer = load_external(target, path, **kwargs)
    return register(
        RewardSpec(name, scorer, description or f"external: {target}", ood=ood, frame_level=frame_level),
        overwrite=True,
    )
