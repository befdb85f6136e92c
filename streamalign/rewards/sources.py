"""Rewards declared by a run: real reward models from local folders and plug-ins, registered lazily.

A run names where its rewards come from in its reward section (flags or run config)::

    --reward-path videoalign=/models/VideoReward,hpsv3=/models/HPSv3      model adapter -> local folder
    --reward-option videoalign.base=/models/Qwen2-VL-2B,hpsv3.batch_size=4   MODEL.KEY=VALUE, to its loader
    --reward-plugin mine=my_pkg.rewards:make@/models/mine                 NAME=module:factory[@PATH]
    --reward-device cuda      (under torchrun: each rank's own GPU; an explicit cuda:N there is refused)

Each source registers its outputs at once (``videoalign_vq`` ... ``videoalign_overall_raw``, ``hpsv3``,
``mine``) with a scorer that loads the model on its first call and keeps it for the process, so every
name, path and import is checked (one line each) before any model loads, and a stage that never scores
never loads. The section is part of the resolved run config (``run.yaml``, and a buffer's ``run.yaml``),
so later stages and every torchrun rank rebuild the same rewards from it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..io import hub
from ..schemas.sections import plugin_parts
from .external import import_factory
from .models.preprocess import grayscale3
from .plan import reward_hold
from .registry import CompositeReward, RewardError, RewardSpec, register

MODEL_KINDS = ("videoalign", "hpsv3", "hpsv2", "clip")  # the adapters of rewards.models
PLUGIN_FLAGS = {"frame_level": False, "ood": False}  # plug-in options read here, not passed to the factory
MODEL_FLAGS = {"fps": 16.0}  # frame rate of the videos scored (the registry passes none): read here


def _value(text: str):
    """'4' -> 4, '0.5' -> 0.5, 'true' -> True, anything else stays a string (YAML scalars)."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return v if isinstance(v, (int, float, bool)) else text


@dataclass(frozen=True)
class RewardSource:
    """One declared reward model (`kind` an adapter of rewards.models) or plug-in (`kind` 'plugin')."""

    name: str  # registered name (a model: the prefix of its outputs)
    kind: str
    path: str | None = None
    target: str | None = None  # plug-in: 'module:factory' or 'file.py:factory'
    options: dict = field(default_factory=dict)
    sha256: str | None = None  # file plug-in: the hash of the file to import (recorded with the run)

    def outputs(self) -> list[tuple[str, str | None]]:
        """(registered name, model output or None) of every reward this source provides."""
        if self.kind == "plugin":
            return [(self.name, None)]
        from .models import model_class, registered_name

        outs = model_class(self.kind).outputs
        return [(registered_name(self.name, o, outs), o) for o in outs]

    def check(self) -> None:
        """Everything that can be checked without loading a model: paths exist, plug-ins import."""
        if self.path is not None and not Path(self.path).exists():
            flag = "--reward-plugin" if self.kind == "plugin" else "--reward-path"
            raise RewardError(f"{flag} {self.name}: {self.path} does not exist (give the local folder of the weights)")
        if self.kind == "plugin":
            import_factory(self.target, self.sha256)

    def register(self, device: str | None, hold: str = "keep") -> list[str]:
        """Register every output (lazily loaded; the source is checked by :func:`register_sources`), its
        model held or offloaded between scoring calls by `hold` (keep | cpu); returns the registered names."""
        plugin = self.kind == "plugin"
        levels = False  # a plug-in gets float videos
        if plugin:
            frame_level, ood = bool(self.options.get("frame_level", False)), bool(self.options.get("ood", False))
        else:
            from .models import model_class

            cls = model_class(self.kind)
            frame_level, ood, levels = cls.frame_level, False, cls.reads_levels(self.options)
        names = []
        for reg, out in self.outputs():
            fn = functools.partial(_score, self, device, hold, out)
            desc = f"{self.kind} {out} from {self.path}"
            if plugin:
                desc = f"plug-in {self.target} ({self.path or 'no path'})"
            register(RewardSpec(reg, fn, desc, ood=ood, frame_level=frame_level, colour=plugin,
                                to_gray=None if plugin else grayscale3, levels=levels), overwrite=True)  # fmt: skip
            names.append(reg)
        return names


_LOADED: dict[tuple, object] = {}  # one loaded scorer per (source, device) for the process


def _freeze(source: RewardSource, device: str | None) -> tuple:
    return (source.kind, source.name, source.path, source.target, tuple(sorted(source.options.items())),
            source.sha256, device)  # fmt: skip


def loaded(source: RewardSource, device: str | None):
    """The source's scorer, loaded on first use: ``(videos, prompts) -> {output: scores}`` of a reward model,
    or the plug-in's own callable."""
    key = _freeze(source, device)
    if key not in _LOADED:
        if source.kind == "plugin":
            kwargs = {k: v for k, v in source.options.items() if k not in PLUGIN_FLAGS}
            factory = import_factory(source.target, source.sha256)
            _LOADED[key] = factory(source.path, **kwargs) if source.path is not None else factory(**kwargs)
        else:
            from .models import all_outputs, load_reward_model

            options = {k: v for k, v in source.options.items() if k not in MODEL_FLAGS}
            if device is not None:
                options.setdefault("device", device)
            model = load_reward_model(source.kind, source.path, **options)
            _LOADED[key] = all_outputs(model, float(source.options.get("fps", MODEL_FLAGS["fps"])))
    return _LOADED[key]


def _score(source: RewardSource, device: str | None, hold: str, output: str | None, videos, prompts):
    """The registered scorer: [B] (video-level) or [B, F] (frame-level) for one output, the model held by
    `hold` (the registration's: a model is loaded once per process, the stage that scores decides)."""
    run = loaded(source, device)
    if getattr(run, "model", None) is not None:
        run.model.set_hold(hold)
    if output is None:
        return run(videos, prompts)
    from .models import output_of

    return output_of(run(videos, prompts), output, f"{source.kind} ({source.path})")


def sources_of(paths: Mapping[str, str], options: Mapping[str, str], plugins: Mapping[str, str]) -> list[RewardSource]:
    """The sources a reward section declares (see the module docstring for the forms)."""
    opts: dict[str, dict] = {}
    for key, value in options.items():
        name, dot, opt = key.partition(".")
        if not dot or not opt:
            raise RewardError(f"--reward-option {key}={value}: expected MODEL.KEY=VALUE (e.g. hpsv3.batch_size=4)")
        if name not in paths and name not in plugins:
            raise RewardError(
                f"--reward-option {key}: no reward source '{name}' (declare it with --reward-path {name}=DIR "
                f"or --reward-plugin {name}=module:factory)"
            )
        opts.setdefault(name, {})[opt] = _value(value)
    out = []
    for name, path in paths.items():
        if name not in MODEL_KINDS:
            raise RewardError(
                f"--reward-path {name}: unknown reward model; choose {', '.join(MODEL_KINDS)} "
                f"(a plug-in of your own: --reward-plugin NAME=module:factory)"
            )
        out.append(RewardSource(name, name, hub.local(path), options=opts.get(name, {})))  # hf:// ids: the cache's
    for name, spec in plugins.items():
        if name in paths:
            raise RewardError(f"--reward-plugin {name}: the name is already a --reward-path model")
        target, path, sha = plugin_parts(spec)
        if ":" not in target:
            raise RewardError(
                f"--reward-plugin {name}={spec}: expected NAME=module:factory or NAME=file.py:factory[@PATH]"
            )
        out.append(RewardSource(name, "plugin", path, target, opts.get(name, {}), sha))
    return out


def register_sources(sources: list[RewardSource], device: str | None = None, hold: str = "keep") -> list[str]:
    """Check every source (and the reward device), then register their outputs (nothing loads yet), the
    models held by `hold` (keep | cpu); returns the names."""
    for s in sources:
        s.check()
    if device is not None and any(s.kind != "plugin" for s in sources):
        from .models.base import pick_device

        pick_device(device)  # a device every rank would share under a launcher: refused before any work
    return [n for s in sources for n in s.register(device, hold)]


def load_kept(sources: list[RewardSource], device: str | None, hold: str) -> int:
    """Load now the reward models that stay on a GPU (`hold` keep), so that the batch sizes the stage picks
    from the free memory count their weights (lazily, the first group's would not); returns how many."""
    if hold != "keep":
        return 0
    from .models.base import pick_device

    todo = [s for s in sources if s.kind != "plugin" and pick_device(s.options.get("device", device)).type == "cuda"]
    for s in todo:
        loaded(s, device)
    return len(todo)


def reward_of(section, rewards: str | None = None, metrics: str | None = None, hold: str | None = None,
              load: bool = False) -> CompositeReward:  # fmt: skip
    """The composite reward of a run's reward section (``schemas.sections.RewardSection``): its sources
    registered (lazily loaded), then its terms (`rewards`/`metrics`: the resolved ones, e.g. the world's
    defaults filled in; default: the section's own) parsed, so an unknown name fails before any load.
    `hold`: keep | cpu, the stage's resolved ``--reward-offload`` (default: the section's, auto as keep: no
    plan, see ``plan.reward_hold``); `load`: the models kept on a GPU load now (:func:`load_kept`)."""
    hold = hold or reward_hold(getattr(section, "reward_offload", "keep"))
    sources = sources_of(section.reward_paths, section.reward_options, section.reward_plugins)
    register_sources(sources, section.reward_device, hold)
    rewards = section.rewards if rewards is None else rewards
    metrics = section.metrics if metrics is None else metrics
    if not rewards:
        raise RewardError("no rewards: give --rewards name=weight,... (the model's world has no defaults)")
    reward = CompositeReward.parse(rewards, metrics or ())
    if load:
        load_kept(sources, section.reward_device, hold)
    return reward
