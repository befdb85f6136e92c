"""Real reward models from local folders: VideoAlign (VQ/MQ/TA), HPSv3, HPSv2.1, CLIP.

``load_reward_model(name, path, **options)`` returns a :class:`~.base.RewardModel`:
``model(videos [B, F, 3, H, W] float in [0, 1] or uint8, prompts, fps) -> {output: float32 [B]}`` and, for the
frame-based ones, ``model.frame_scores(videos, prompts) -> {output: float32 [B, F]}``; ``model.offload()``
moves it off the accelerator, ``model.onload()`` back, and ``model.set_hold("cpu")`` does both around every
scoring call (``--reward-offload``). ``register_model_reward(name, path, **options)`` puts every
output into the reward registry (``videoalign_mq``, ``hpsv3``, ``hpsv3_sigma``, ...) so composites use it
like a built-in. Nothing is downloaded; see each module for its folder layout and options, and
docs/rewards.md for all of them with their references.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from ..registry import RewardSpec, register
from .base import RewardModel, RewardModelError
from .preprocess import grayscale3

ADAPTERS = {
    "videoalign": ("videoalign", "VideoAlignReward"),
    "hpsv3": ("hpsv3", "HPSv3Reward"),
    "hpsv2": ("hpsv2", "HPSv2Reward"),
    "clip": ("clip", "CLIPReward"),
}


def load_reward_model(name: str, path: str | Path, **options) -> RewardModel:
    """Load reward model `name` (videoalign, hpsv3, hpsv2, clip) from the local `path`.

    Common options: ``device`` (default cuda if available), ``dtype`` (bf16 on CUDA, fp32 on CPU),
    ``batch_size`` (videos per forward for videoalign, frames per forward for the others)."""
    return model_class(name)(path, **options)


def model_class(name: str) -> type[RewardModel]:
    """The adapter class of reward model `name` (its ``outputs`` and ``frame_level`` need no weights)."""
    if name not in ADAPTERS:
        raise RewardModelError(f"unknown reward model '{name}': choose one of {', '.join(ADAPTERS)}")
    module, cls = ADAPTERS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


PRIMARY = "score"  # the output registered under the bare prefix (hpsv3 = mu; hpsv3_sigma beside it)


def registered_name(prefix: str, output: str, outputs: Sequence[str]) -> str:
    """The registry name of a model output: the prefix alone for the primary (or only) output, else
    ``<prefix>_<output>`` in lower case (``videoalign_mq``, ``hpsv3_sigma``)."""
    return prefix if output == PRIMARY or len(outputs) == 1 else f"{prefix}_{output.lower()}"


def output_of(result: dict, output: str, who: str):
    """``result[output]``, or one line when this checkpoint does not give that output."""
    if output not in result:
        raise RewardModelError(f"reward model {who} gives no '{output}' output (it gives {', '.join(result)})")
    return result[output]


class LastCall:
    """One-entry cache so the registry's one-term-at-a-time calls run a multi-output model once per batch."""

    def __init__(self, fn, model: RewardModel | None = None) -> None:
        self.fn, self.key, self.value = fn, None, None
        self.model = model  # the reward model behind `fn` (its hold is set per stage, rewards.sources)

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]):
        key = (videos._version, tuple(videos.shape), list(prompts))
        ref = self.key[0]() if self.key is not None else None
        if ref is not videos or self.key[1:] != key:
            self.key, self.value = (weakref.ref(videos), *key), None
            self.value = self.fn(videos, prompts)
        return self.value


def all_outputs(model: RewardModel, fps: float = 16.0) -> LastCall:
    """``run(videos, prompts) -> {output: [B] or [B, F]}``: per-frame scores of a frame-based model, else
    per-video scores of videos at `fps`; one model call per batch however many outputs are read."""
    if model.frame_level:
        return LastCall(lambda v, p: model.frame_scores(v, p), model)
    return LastCall(lambda v, p: model(v, p, fps=fps), model)


def register_model_reward(
    name: str,
    path: str | Path | None = None,
    *,
    model: RewardModel | None = None,
    prefix: str | None = None,
    fps: float = 16.0,
    ood: bool = False,
    **options,
) -> list[str]:
    """Load reward model `name` from `path` (or reuse `model`) and register each output under
    ``<prefix>_<output>`` in lower case (``videoalign_vq``, ..., ``videoalign_overall_raw``, ``hpsv3_sigma``),
    or ``<prefix>`` alone for the ``score`` output (``hpsv3``, ``hpsv2``, ``clip``). `prefix` defaults to
    `name`; `fps` is the frame rate of the videos the registry will pass (it has no fps argument).
    Frame-based models register per-frame scores (``frame_level=True``), so ``hpsv3:top30`` gives the mean of
    the best 30% of frames.
    Returns the registered names."""
    if model is None:
        if path is None:
            raise RewardModelError(f"register_model_reward('{name}'): give a local path or a loaded model")
        model = load_reward_model(name, path, **options)
    elif options:
        raise RewardModelError(f"register_model_reward('{name}'): options {sorted(options)} need a path, not a model")
    prefix = prefix or name
    run = all_outputs(model, fps)
    names = []
    levels = model.reads_levels(vars(model))
    for out in model.outputs:
        reg = registered_name(prefix, out, model.outputs)
        register(
            RewardSpec(
                reg,
                lambda v, p, out=out: output_of(run(v, p), out, model.name),
                f"{model.name} {out} ({'per frame' if model.frame_level else 'per video'}) from {path or 'a model'}",
                ood=ood,
                frame_level=model.frame_level,
                colour=False,  # `:gray` allowed: the reference's 3-channel grayscale before preprocessing
                to_gray=grayscale3,
                levels=levels,
            ),
            overwrite=True,
        )
        names.append(reg)
    return names


__all__ = ["ADAPTERS", "RewardModel", "RewardModelError", "all_outputs", "load_reward_model", "model_class",
           "output_of", "register_model_reward", "registered_name"]
