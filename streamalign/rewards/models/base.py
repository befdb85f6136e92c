"""What every reward-model adapter shares: errors, device/dtype choice, offloading, input checks, safe loading."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ...models.checkpoint import CheckpointError, _read_raw
from ..registry import RewardError, as_float, check_videos


class RewardModelError(RewardError):
    """A reward model cannot be loaded (missing file or package, wrong layout) or cannot score its input."""


def require(module: str, who: str, package: str | None = None):
    """Import `module` or fail with one line naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = package or module.split(".")[0]
        raise RewardModelError(
            f"{who}: the Python package '{pkg}' is missing; install it with pip install 'streamalign[rewards]' "
            f"(or pip install {pkg})"
        ) from None


def need_file(path: Path, who: str, what: str, hint: str) -> Path:
    """`path` if it exists, else one line: what is missing, where, and how to fix it."""
    if not path.exists():
        raise RewardModelError(f"{who}: {what} not found at {path}; {hint}")
    return path


def read_json(path: Path, who: str, hint: str) -> dict:
    need_file(path, who, path.name, hint)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RewardModelError(f"{who}: cannot read {path}: {e}") from None


def read_tensors(path: Path, who: str, hint: str, entry: str | None = None) -> dict[str, torch.Tensor]:
    """A tensors-only state dict from .safetensors or .pt/.pth (``torch.load(weights_only=True)``: nothing is
    unpickled); `entry` picks a top-level key (HPSv2's ``["state_dict"]``)."""
    need_file(path, who, "weights file", hint)
    try:
        raw = _read_raw(path)
    except CheckpointError as e:
        raise RewardModelError(f"{who}: {e}") from None
    if entry is not None:
        if not isinstance(raw, Mapping) or entry not in raw:
            keys = list(raw)[:6] if isinstance(raw, Mapping) else type(raw).__name__
            raise RewardModelError(f"{who}: {path} has no '{entry}' entry (top-level: {keys})")
        raw = raw[entry]
    raw = dict(raw) if isinstance(raw, Mapping) else raw  # safetensors: every tensor read once, here
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise RewardModelError(f"{who}: {path} does not hold a flat state dict of tensors")
    return raw


def launched() -> bool:
    """True under a launcher that starts several processes on a machine (torchrun, accelerate)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1


def pick_device(device: str | torch.device | None) -> torch.device:
    """None: this rank's GPU if CUDA is available, else cpu. ``cuda`` is this rank's own GPU (``LOCAL_RANK``)
    under a launcher, as ``--device`` is; an explicit ``cuda:N`` under a launcher that starts several
    processes per machine is refused: every rank would load its reward models onto the same GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RewardModelError(f"--reward-device {device}: not a torch device (give cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RewardModelError(f"--reward-device {device}: CUDA is not available on this machine (use cpu)")
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if dev.type == "cuda" and dev.index is not None and launched():
        raise RewardModelError(
            f"--reward-device {device}: under a launcher every rank would put its reward models on GPU "
            f"{dev.index}; give --reward-device cuda (each rank's own GPU, LOCAL_RANK) or cpu"
        )
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere, unless given ('float32', 'bfloat16', 'float16' or a torch dtype)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise RewardModelError(f"dtype must be float32, bfloat16 or float16, got '{dtype}'")
        return getattr(torch, dtype)
    return dtype


class RewardModel:
    """Base of the adapters. ``model(videos [B, F, 3, H, W] in [0, 1], prompts, fps) -> {output: float32 [B]}``;
    frame-based models also give ``frame_scores(videos, prompts) -> {output: float32 [B, F]}``.

    Subclasses set ``name``, ``outputs``, ``frame_level``, ``self.net`` (the torch module) and implement
    ``_score`` (video-level) or ``_frame_scores`` (frame-level: [N frames] for N = B * F)."""

    name = "reward"
    outputs: tuple[str, ...] = ("score",)
    frame_level = False
    hold = "keep"  # between scoring calls: keep (stay on the device) | cpu (offload after each call); set_hold

    def __init__(self, device=None, dtype=None, batch_size: int = 8) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        if batch_size < 1:
            raise RewardModelError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.net: torch.nn.Module | None = None
        self._offloaded = False

    def check_resample(self, mode: str) -> str:
        from .preprocess import RESIZE_MODES

        if mode not in RESIZE_MODES:
            raise RewardModelError(f"{self.name}: resample must be one of {RESIZE_MODES}, got '{mode}'")
        return mode

    # -- placement -------------------------------------------------------------------------------
    def _place(self) -> None:
        self.net.to(self.device, self.dtype).eval().requires_grad_(False)
        self._offloaded = False

    def offload(self) -> RewardModel:
        """Move the weights to the CPU (and free the accelerator's cache); the next call moves them back."""
        self.net.to("cpu")
        self._offloaded = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self

    def onload(self) -> RewardModel:
        """Move offloaded weights back to the model's device (and dtype); nothing when they are there."""
        if self._offloaded:
            self._place()
        return self

    def set_hold(self, hold: str) -> RewardModel:
        """``keep``: the weights stay on the device between scoring calls; ``cpu``: every scoring call
        onloads them first and offloads them after (``--reward-offload``, resolved by the stage)."""
        if hold not in ("keep", "cpu"):
            raise RewardModelError(f"{self.name}: hold must be keep or cpu, got {hold!r}")
        self.hold = hold
        return self

    def to(self, device: str | torch.device) -> RewardModel:
        self.device = torch.device(device)
        self._place()
        return self

    def _ready(self) -> None:
        self.onload()

    def _release(self) -> None:
        if self.hold == "cpu":
            self.offload()

    # -- scoring ---------------------------------------------------------------------------------
    def _check(self, videos: torch.Tensor, prompts: Sequence[str]) -> list[str]:
        check_videos(videos, self.name)
        if videos.shape[2] != 3:
            raise RewardModelError(
                f"reward '{self.name}' needs RGB videos [B, F, 3, H, W], got {videos.shape[2]} channel(s)"
            )
        prompts = list(prompts)
        if len(prompts) != videos.shape[0] or not all(isinstance(p, str) for p in prompts):
            raise RewardModelError(f"reward '{self.name}': {videos.shape[0]} videos need as many prompt strings")
        return prompts

    @torch.no_grad()
    def frame_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """{output: float32 [B, F]}: every frame scored with its video's prompt (frame-level models); uint8
        videos are converted to float one batch of frames at a time."""
        if not self.frame_level:
            raise RewardModelError(f"reward model '{self.name}' scores whole videos, not frames")
        prompts = self._check(videos, prompts)
        self._ready()
        b, f = videos.shape[:2]
        frames = videos.flatten(0, 1)
        texts = [p for p in prompts for _ in range(f)]
        out: dict[str, list[torch.Tensor]] = {}
        try:
            for i in range(0, b * f, self.batch_size):
                chunk = self._frame_scores(as_float(frames[i : i + self.batch_size]), texts[i : i + self.batch_size])
                for k, v in chunk.items():  # the outputs this checkpoint gives (HPSv3 without sigma: score only)
                    out.setdefault(k, []).append(v.float().cpu())
        finally:
            self._release()
        return {k: torch.cat(v).view(b, f) for k, v in out.items()}

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts: Sequence[str], fps: float = 16.0) -> dict[str, torch.Tensor]:
        """{output: float32 [B]} for every output of the model (videos float in [0, 1] or uint8 levels)."""
        return self.score_batches(videos, prompts, fps)

    def score_batches(self, videos: torch.Tensor, prompts: Sequence[str], fps: float, **options):
        """{output: float32 [B]}: frame scores aggregated, or ``_score`` on slices of ``batch_size`` videos
        (`options` go to ``_score``)."""
        if self.frame_level:
            return self.aggregate_outputs(self.frame_scores(videos, prompts))
        prompts = self._check(videos, prompts)
        self._ready()
        try:
            parts = [
                self._score(videos[i : i + self.batch_size], prompts[i : i + self.batch_size], fps, **options)
                for i in range(0, videos.shape[0], self.batch_size)
            ]
        finally:
            self._release()
        return {k: torch.cat([p[k].float().cpu() for p in parts]) for k in parts[0]}

    def aggregate_outputs(self, frame_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{output: [B, F]} -> {output: [B]}: each output by :meth:`aggregate` unless the model says otherwise."""
        return {k: self.aggregate(v) for k, v in frame_scores.items()}

    def aggregate(self, frame_scores: torch.Tensor) -> torch.Tensor:
        """Frame scores [B, F] -> [B] (mean unless the model says otherwise)."""
        return frame_scores.mean(1)

    @classmethod
    def reads_levels(cls, options: dict) -> bool:
        """True when the model's first step on a frame is 8-bit quantisation ``round(255 x)``, so a uint8 video
        scores exactly as the float video it came from (the loader `options` decide for some models)."""
        return False

    def _score(self, videos: torch.Tensor, prompts: list[str], fps: float, **options) -> dict[str, torch.Tensor]:
        """Video-level scores of one batch; `videos` float in [0, 1] or uint8 (convert with ``as_float``)."""
        raise NotImplementedError

    def _frame_scores(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
