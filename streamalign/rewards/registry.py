"""Reward registry: name -> scorer ``(videos [B, F, C, H, W] float in [0, 1], prompts) -> float32 [B]``.

A :class:`RewardSpec` registers a function that scores every frame (``[B, F]``, or ``[B, F-1]`` for
frame pairs) or whole videos (``[B]``). A :class:`Reward` is a spec plus options: frame aggregation
(``mean``, or ``topK``: the mean of the best K% of frames) and grayscale input. A
:class:`CompositeReward` is a weighted sum whose per-reward values are always returned separately.
Out-of-domain metrics are registered with ``ood=True``: reported, never part of a composite by default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..registry import Registry


class RewardError(ValueError):
    """A reward cannot score its input (unparseable prompt, wrong video format, unknown name)."""


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: Callable[[torch.Tensor, list], torch.Tensor]
    description: str
    ood: bool = False  # out-of-domain metric: reported, not optimised by default
    # prompts -> what fn receives (e.g. a world's grammar parsed), None on a prompt it cannot read; None: text
    parse_prompt: Callable[[str], object | None] | None = None
    prompt_format: str = ""  # the prompt form parse_prompt reads, for the error message
    colour: bool = True  # needs RGB input (refuses the grayscale option)
    grayscale: bool = False  # default of the grayscale option
    frame_level: bool = True  # fn returns [B, F'] (aggregated here) instead of [B]
    # how the grayscale option converts RGB [B, F, 3, H, W] (None: BT.601 luma, 1 channel); reward models
    # whose references take 3-channel grayscale (torchvision weights) give their own
    to_gray: Callable[[torch.Tensor], torch.Tensor] | None = None
    # fn (and to_gray) take uint8 videos and quantise float ones to 8 bits first, so a uint8 video scores
    # exactly as the float video it was rounded from (reward models that read 8-bit frames)
    levels: bool = False


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise RewardError(f"reward name '{name}' must be lower-case letters, digits and '_'")


# the built-in worlds declare the modules that register their rewards under the entry-point group
# ``streamalign.rewards`` in pyproject.toml; an installed plug-in package can add its own
REWARDS: Registry[RewardSpec] = Registry("rewards", "reward", check=_check_name, error=RewardError)


def register(spec: RewardSpec, overwrite: bool = False) -> RewardSpec:
    return REWARDS.register(spec.name, spec, overwrite)


def get_spec(name: str) -> RewardSpec:
    return REWARDS.get(name)


def available(ood: bool | None = None) -> list[str]:
    """Registered names (only in-domain rewards with ood=False, only OOD metrics with ood=True)."""
    return [n for n, s in REWARDS.items() if ood is None or s.ood == ood]


def to_grayscale(videos: torch.Tensor) -> torch.Tensor:
    """BT.601 luma [B, F, 1, H, W] of RGB videos [B, F, 3, H, W] (a 1-channel input is returned as is)."""
    if videos.shape[2] == 1:
        return videos
    w = torch.tensor([0.299, 0.587, 0.114], device=videos.device, dtype=videos.dtype).view(1, 1, 3, 1, 1)
    return (videos * w).sum(2, keepdim=True)


def as_float(videos: torch.Tensor) -> torch.Tensor:
    """Videos as float32 in [0, 1]: uint8 levels divided by 255 (``round(255 x)`` gives the levels back
    exactly), floats cast."""
    return videos.float() / 255 if videos.dtype == torch.uint8 else videos.float()


def check_videos(videos: torch.Tensor, who: str) -> None:
    """Videos [B, F, 1|3, H, W]: floats in [0, 1] or uint8 levels."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] not in (1, 3):
        shape = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise RewardError(f"reward '{who}': videos must be [B, F, 3, H, W] floats in [0, 1], got {shape}")
    if videos.dtype == torch.uint8:
        return
    if not videos.is_floating_point():
        raise RewardError(f"reward '{who}': videos must be floats in [0, 1] or uint8, got {videos.dtype}")
    lo, hi = videos.min().item(), videos.max().item()
    if not (lo >= -1e-4 and hi <= 1 + 1e-4) or math.isnan(lo) or math.isnan(hi):
        raise RewardError(f"reward '{who}': video values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")


@dataclass(frozen=True)
class Reward:
    """A registered reward with options. ``aggregate``: 'mean' or 'top' (mean of the best `topk` fraction
    of frames); ``grayscale``: None = the reward's default."""

    name: str
    aggregate: str = "mean"
    topk: float = 0.3
    grayscale: bool | None = None

    def __post_init__(self) -> None:
        spec = get_spec(self.name)
        if self.aggregate not in ("mean", "top"):
            raise RewardError(f"reward '{self.name}': aggregate must be 'mean' or 'top', got '{self.aggregate}'")
        if not 0 < self.topk <= 1:
            raise RewardError(f"reward '{self.name}': topk must be a fraction in (0, 1], got {self.topk}")
        if self.grayscale and spec.colour:
            raise RewardError(f"reward '{self.name}' needs colour: the grayscale option does not apply")

    @property
    def spec(self) -> RewardSpec:
        return get_spec(self.name)

    @property
    def label(self) -> str:
        """Name plus the non-default options (``direction_match:top30:gray``): a column name."""
        spec, out = self.spec, self.name
        if self.aggregate == "top":
            out += f":top{round(self.topk * 100)}"
        if self.grayscale is not None and self.grayscale != spec.grayscale:
            out += ":gray" if self.grayscale else ":rgb"
        return out

    def prepare(self, videos: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list]:
        spec = self.spec
        check_videos(videos, self.name)
        if len(prompts) != videos.shape[0]:
            raise RewardError(f"reward '{self.name}': {videos.shape[0]} videos but {len(prompts)} prompts")
        gray = spec.grayscale if self.grayscale is None else self.grayscale
        if not spec.levels:  # uint8 kept only for scorers that read 8-bit levels (converted per batch there)
            videos = as_float(videos)
        if gray:
            videos = (spec.to_gray or to_grayscale)(videos)
        elif spec.colour and videos.shape[2] != 3:
            raise RewardError(f"reward '{self.name}' needs RGB videos, got {videos.shape[2]} channel(s)")
        videos = videos if spec.levels and videos.dtype == torch.uint8 else videos.float()
        return videos, parse_all(prompts, spec) if spec.parse_prompt else list(prompts)

    def frame_scores(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-frame (or per-pair) scores [B, F'] of a frame-level reward."""
        if not self.spec.frame_level:
            raise RewardError(f"reward '{self.name}' scores whole videos, not frames")
        v, p = self.prepare(videos, prompts)
        return self.spec.fn(v, p).float()

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """float32 [B]."""
        v, p = self.prepare(videos, prompts)
        s = self.spec.fn(v, p).float()
        if not self.spec.frame_level:
            return s.reshape(-1)
        if self.aggregate == "mean":
            return s.mean(1)
        k = max(1, math.ceil(self.topk * s.shape[1]))
        return s.topk(k, dim=1).values.mean(1)


def parse_all(prompts: Sequence[str], spec: RewardSpec) -> list:
    out = []
    for text in prompts:
        parsed = spec.parse_prompt(text) if isinstance(text, str) else None
        if parsed is None:
            raise RewardError(f"reward '{spec.name}' cannot parse prompt {text!r}: it expects '{spec.prompt_format}'")
        out.append(parsed)
    return out


_TERM = re.compile(
    r"^(?P<name>[a-z][a-z0-9_]*(\.[A-Za-z0-9_]+)?)(?P<opts>(:[a-z0-9]+)*)(=(?P<w>[-+0-9.eE]+))?$"
)


def parse_term(term: str) -> tuple[Reward, float]:
    """``name[:mean|:topNN][:gray|:rgb][=weight]`` -> (Reward, weight); weight defaults to 1. A model's
    output may be named ``model.OUTPUT`` (``videoalign.MQ`` is the registered ``videoalign_mq``)."""
    m = _TERM.match(term.strip())
    if m is None:
        raise RewardError(f"cannot parse reward term '{term}': expected name[:topNN][:gray][=weight]")
    kw: dict = {}
    for opt in filter(None, m.group("opts").split(":")):
        if opt == "mean":
            kw["aggregate"] = "mean"
        elif opt.startswith("top") and opt[3:].isdigit():
            kw.update(aggregate="top", topk=int(opt[3:]) / 100)
        elif opt in ("gray", "rgb"):
            kw["grayscale"] = opt == "gray"
        else:
            raise RewardError(f"reward term '{term}': unknown option ':{opt}' (use :mean, :topNN, :gray, :rgb)")
    try:
        weight = float(m.group("w")) if m.group("w") else 1.0
    except ValueError:
        raise RewardError(f"reward term '{term}': weight '{m.group('w')}' is not a number") from None
    if not math.isfinite(weight):
        raise RewardError(f"reward term '{term}': weight must be finite")
    return Reward(m.group("name").replace(".", "_").lower(), **kw), weight


class CompositeReward:
    """Weighted sum of rewards; every reward's value is returned separately, and OOD metrics (reported,
    weight-free) alongside. ``CompositeReward.parse("colour_match=1,direction_match:top30=0.5")``."""

    def __init__(self, terms: Sequence[tuple[Reward, float]], metrics: Sequence[Reward] = ()) -> None:
        if not terms:
            raise RewardError("a composite reward needs at least one term")
        labels = [r.label for r, _ in terms] + [r.label for r in metrics]
        dup = {x for x in labels if labels.count(x) > 1}
        if dup or "composite" in labels:
            raise RewardError(f"reward labels must be unique and not 'composite': {sorted(dup or {'composite'})}")
        self.terms = list(terms)
        self.metrics = list(metrics)

    @classmethod
    def parse(cls, spec: str, metrics: str | Sequence[str] = ()) -> CompositeReward:
        terms = [parse_term(t) for t in spec.split(",") if t.strip()]
        names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
        return cls(terms, [parse_term(m)[0] for m in names if m.strip()])

    @property
    def reads_levels(self) -> bool:
        """True when every term and metric reads 8-bit frames first: uint8 videos score exactly as their
        floats (the collector then keeps decoded videos as uint8)."""
        return all(r.spec.levels for r, _ in self.terms) and all(r.spec.levels for r in self.metrics)

    @property
    def weights(self) -> dict[str, float]:
        return {r.label: w for r, w in self.terms}

    @property
    def names(self) -> list[str]:
        """Column names of the output: the terms, the metrics, then 'composite'."""
        return [r.label for r, _ in self.terms] + [r.label for r in self.metrics] + ["composite"]

    def __call__(
        self, videos: torch.Tensor, prompts: Sequence[str], weights: Mapping[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """{label: float32 [B]} for every term and metric, plus 'composite' (weights may be overridden)."""
        out = {r.label: r(videos, prompts) for r, _ in self.terms}
        out.update({r.label: r(videos, prompts) for r in self.metrics})
        out["composite"] = composite(out, weights if weights is not None else self.weights)
        return out


def composite(
    values: Mapping[str, torch.Tensor], weights: Mapping[str, float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The one weighted sum of per-reward values ``sum_k w_k values[k]`` (scoring, training advantages,
    the manifest, offline re-weighting), accumulated in `dtype` in the weights' order: [B]."""
    missing = [k for k in weights if k not in values]
    if missing:
        raise RewardError(f"no values for reward(s) {missing}; have {sorted(values)}")
    total = sum(float(w) * torch.as_tensor(values[k]).to(dtype) for k, w in weights.items())
    return torch.as_tensor(total, dtype=dtype)
