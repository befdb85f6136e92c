"""External reward models (HPSv3, VideoAlign, CLIP, ...) plugged in from the user's own code and weights.

A plug-in is a factory ``factory(path, **kwargs) -> scorer`` where ``path`` is the local folder or file of
the reward model's weights and ``scorer(videos, prompts)`` takes videos ``[B, F, 3, H, W]`` in [0, 1] and
a list of prompt strings and returns ``[B]`` (whole videos) or ``[B, F]`` (frames; ``frame_level=True``).
The factory is named as ``"package.module:factory"`` or ``"/path/to/file.py:factory"``. Nothing is
downloaded: the factory loads from ``path`` (e.g. ``from_pretrained(path, local_files_only=True)``).
"""

from __future__ import annotations

import functools
import hashlib
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


def import_factory(target: str, sha256: str | None = None) -> Callable:
    """The callable named ``package.module:factory`` or ``/path/file.py:factory`` (imported once). With
    `sha256`, a file plug-in is used only when the bytes imported have that hash."""
    found, factory = _import(target)
    if sha256 is not None and found is not None and found != sha256:
        raise RewardError(f"external reward '{target}': the file has changed since it was named (sha256 "
                          f"{sha256[:12]}... expected, {found[:12]}... found): name it again")  # fmt: skip
    return factory


@functools.cache
def _import(target: str) -> tuple[str | None, Callable]:
    """(sha256 of the file's bytes, None for a module; the factory): the bytes hashed are the bytes run."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"external reward '{target}': expected 'package.module:factory' or 'file.py:factory'")
    sha = None
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise RewardError(f"external reward '{target}': file {file} not found")
        source = file.read_bytes()
        sha = hashlib.sha256(source).hexdigest()
        spec = importlib.util.spec_from_file_location(f"streamalign_external_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        exec(compile(source, str(file), "exec"), module.__dict__)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise RewardError(f"external reward '{target}': cannot import {module_name}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise RewardError(f"external reward '{target}': {module_name} has no callable '{attr}'")
    return sha, factory


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
