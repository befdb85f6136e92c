"""Run-config sections shared by several stages: the model, a policy (model + adapter), prompts, rewards,
the hardware a stage runs on (device, compute dtype, text-encoder offload, CPU threads, compiled blocks)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..io.hub import is_hub_id
from .config import ModelConfig
from .run import RUN_FILE, Section, SettingError, arg, parse_pairs, read_run_file

# a dtype by name: "auto" is the compute dtype (bf16 on CUDA, fp32 on CPU); see models/placement.py
DtypeName = Literal["auto", "fp32", "bf16", "fp16"]
TextOffload = Literal["auto", "keep", "cpu", "free"]
RewardOffload = Literal["auto", "keep", "cpu"]


def absolute(path: str | None) -> str | None:
    """The one rule for paths recorded in ``run.yaml``: absolute (a URL or hub id, ``X://...``, as given),
    so a recorded run rebuilds from any working directory."""
    if path is None or "://" in str(path):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def absolute_fields(data: Any, names: tuple[str, ...], keep: tuple[str, ...] = ()) -> Any:
    """`data` (a section's input mapping) with the path fields `names` made :func:`absolute` (values in
    `keep`, e.g. ``none``, as given)."""
    if not isinstance(data, dict):
        return data
    return {**data, **{k: absolute(data[k]) for k in names if isinstance(data.get(k), str) and data[k] not in keep}}


class ModelSection(Section):
    """Model"""

    # the policy every stage loads: base weights + the LoRA the model ships (LongLive), merged exactly;
    # a stage's own adapters (collect/generate --lora, train's LoRA, merge's) go on top of it
    config: str = arg("shapes", "Model config: preset name or YAML path.", short="-c")
    checkpoint: str | None = arg(None, "Generator weights, a path or hf://ORG/REPO[@REV]/FILE (default: the "
                                 "config's, e.g. the shipped shapes weights).")  # fmt: skip
    base_lora: str | None = arg(None, "The LoRA the model ships (LongLive's lora.pt), merged exactly into the "
                                "base weights ('none': weights it is already merged into).")  # fmt: skip
    base_lora_alpha: float | None = arg(None, "Alpha of --base-lora (default: the config's, else the file's, "
                                        "else its rank).")  # fmt: skip
    wan_dir: str | None = arg(None, "Diffusers Wan2.1 folder (UMT5 + VAE), a path or hf://ORG/REPO[@REV].")

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: Any) -> Any:
        data = absolute_fields(data, ("checkpoint", "base_lora", "wan_dir", "lora"), keep=("none",))
        config = data.get("config") if isinstance(data, dict) else None
        if isinstance(config, str) and (Path(config).is_file() or config.endswith((".yaml", ".yml"))):
            data = {**data, "config": absolute(config)}  # a YAML path; a preset name stays a name
        return data


class PolicySection(ModelSection):
    """Model"""

    lora: str | None = arg(None, "LoRA adapter (peft folder or LongLive file) merged on top of the policy.")
    lora_alpha: float | None = arg(None, "LoRA alpha (default: adapter config, else rank).")


class CacheSection(Section):
    """KV cache"""

    # the cache policy a rollout runs under: a buffer's entries are replayed under the one they were
    # collected with (train reads it from the buffer's run.yaml)
    sink: int | None = Field(None, ge=0, description="Sink frames kept forever (default: the config's, e.g. "
                             "LongLive's 3).")  # fmt: skip
    window: int | None = Field(None, ge=0, description="Rolling window in frames, the current chunk included "
                               "(default: the config's, e.g. LongLive's 9; 0: a global cache).")  # fmt: skip

    def apply(self, model: ModelConfig) -> ModelConfig:
        """`model` with the sink / window given here (the config's where not given)."""
        if self.sink is None and self.window is None:
            return model
        c = model.cache
        window = c.window if self.window is None else (self.window or None)
        return model.with_overrides(cache={"sink": c.sink if self.sink is None else self.sink, "window": window})

    @staticmethod
    def of(model: ModelConfig) -> dict[str, int]:
        """The flags that reproduce `model`'s cache policy (what run.yaml records)."""
        return {"sink": model.cache.sink, "window": model.cache.window or 0}


class RewardHolding(Section):
    """Rewards"""

    # one declaration for the stages (collect, train --mode on, evaluate, merge) and `plan`; the rule that
    # resolves auto is plan.reward_hold (docs/planner-rewards.md)
    reward_offload: RewardOffload = arg("auto", "Reward models between scoring calls: keep (on the GPU) | cpu "
                                        "(moved off after each call, back for the next) | auto (cpu when the "
                                        "stage's plan does not fit with them kept).")  # fmt: skip


class RewardSection(RewardHolding):
    """Rewards"""

    rewards: str | None = arg(None, "Composite: name[:topNN][:gray]=weight,... (default: the world's).")
    metrics: str | None = arg(None, "OOD metrics stored alongside, comma-separated (default: the world's).")
    # where rewards come from beyond the registry (rewards/sources.py): recorded with the run, so later
    # stages and every rank rebuild them
    reward_paths: dict[str, str] = arg({}, "Reward models from folders: MODEL=DIR,... (videoalign, hpsv3, hpsv2, "
                                       "clip); DIR may be hf://ORG/REPO[@REV][/PATH].",
                                       flag="--reward-path")  # fmt: skip
    reward_options: dict[str, str] = arg({}, "Reward model / plug-in options: NAME.KEY=VALUE,... (e.g. "
                                         "videoalign.base=DIR, hpsv3.batch_size=4, NAME.fps=16).",
                                         flag="--reward-option")  # fmt: skip
    reward_plugins: dict[str, str] = arg({}, "Plug-in rewards: NAME=module:factory[@PATH] or "
                                         "NAME=file.py:factory[@PATH],...", flag="--reward-plugin")  # fmt: skip
    reward_device: str | None = arg(None, "Device of the reward models (default: cuda if available, else cpu; "
                                    "under torchrun cuda is each rank's GPU and cuda:N is refused).")  # fmt: skip
    rewards_from: str | None = arg(None, "Take the rewards not given here (names, weights, models, plug-ins) from "
                                   "the run.yaml of a buffer or run folder.")  # fmt: skip
    # a plug-in is code: one that a record (a buffer's or run's run.yaml, which may come from anyone) names
    # is imported only when the user names it again or passes this (docs/trust.md)
    trust_plugins: bool = arg(False, "Import the reward plug-ins that a --rewards-from record (or the --buffer's "
                              "run.yaml) names without naming them again: they are code.")  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("rewards_from"):
                data = {**data, "rewards_from": os.path.abspath(data["rewards_from"])}
                recorded, file = recorded_rewards(data["rewards_from"])
                if data.get("reward_plugins") in (None, {}, "") and recorded.get("reward_plugins"):
                    trust_recorded_plugins(recorded["reward_plugins"], file, bool(data.get("trust_plugins")))
                for key, value in recorded.items():
                    if data.get(key) in (None, {}, ""):
                        data[key] = value
            flags = {"reward_paths": ("--reward-path", "MODEL=DIR"),
                     "reward_options": ("--reward-option", "NAME.KEY=VALUE"),
                     "reward_plugins": ("--reward-plugin", "NAME=module:factory[@PATH]")}  # fmt: skip
            data = {**data, **{k: parse_pairs(data[k], *flags[k]) for k in flags if isinstance(data.get(k), str)}}
            # local paths made absolute: the recorded run rebuilds the rewards from any working directory
            if isinstance(data.get("reward_paths"), dict):
                data["reward_paths"] = {k: v if is_hub_id(v) else os.path.abspath(v)
                                        for k, v in data["reward_paths"].items()}  # fmt: skip
            if isinstance(data.get("reward_plugins"), dict):
                data["reward_plugins"] = {k: pinned_plugin(k, v) for k, v in data["reward_plugins"].items()}
            if isinstance(data.get("reward_options"), dict) and isinstance(data.get("reward_paths"), dict):
                data["reward_options"] = {k: absolute_option(k, v, data["reward_paths"])
                                          for k, v in data["reward_options"].items()}  # fmt: skip
        return data


REWARD_FIELDS = ("rewards", "metrics", "reward_paths", "reward_options", "reward_plugins", "reward_device")


def recorded_rewards(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(the reward fields recorded in a run's ``run.yaml``, that file) (a buffer's: collect; a train run's:
    rollouts; an evaluation's: eval), given the file or its folder."""
    file = Path(path) / RUN_FILE if Path(path).is_dir() else Path(path)
    config = read_run_file(file)
    for section in config.values():
        if isinstance(section, dict) and section.get("rewards"):
            return {k: section[k] for k in REWARD_FIELDS if k in section}, file
    raise ValueError(f"--rewards-from {path}: {file} records no rewards (give a buffer or a run folder)")


def trust_recorded_plugins(plugins: Any, file: Path, trusted: bool) -> None:
    """A record's plug-ins are code from whoever wrote the record: refuse them unless `trusted` (the user's
    ``--trust-plugins``), naming the first and how to allow it."""
    if trusted:
        return
    plugins = plugins if isinstance(plugins, dict) else parse_pairs(plugins, "--reward-plugin")
    name, spec = sorted(plugins.items())[0]
    target, path, sha = plugin_parts(spec)
    given = target + (f"@{path}" if path else "")
    pin = f", sha256 {sha[:12]}..." if sha else ""
    raise SettingError(f"{file} names the reward plug-in '{name}' ({given}{pin}), which is code: a recorded "
                       f"plug-in is never imported unless you name it: pass --reward-plugin {name}={given} "
                       "(or --trust-plugins to trust every plug-in this record names)")  # fmt: skip


PLUGIN_PIN = "#sha256="  # a file plug-in's spec ends with its file's hash: file.py:factory[@PATH]#sha256=HEX


def plugin_parts(spec: str) -> tuple[str, str | None, str | None]:
    """(target, weights path, sha256 of the plug-in file) of a spec ``target[@PATH][#sha256=HEX]`` (None: not
    given); target is ``module:factory`` or ``file.py:factory``."""
    body, pin, sha = str(spec).rpartition(PLUGIN_PIN)
    if not pin:
        body, sha = str(spec), ""
    target, _, path = body.partition("@")
    return target, path or None, sha or None


def plugin_file(target: str) -> Path | None:
    """The file of a ``file.py:factory`` target (None for ``module:factory``)."""
    module, colon, _ = target.rpartition(":")
    return Path(module) if colon and module.endswith(".py") else None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_plugin(name: str, spec: str) -> str:
    """``file.py:factory[@PATH]`` with both paths absolute and the file's sha256 appended (a ``module:factory``
    keeps its module name). A spec that already holds a hash (a recorded one) must match the file: a plug-in
    changed since it was recorded is refused (name it again to use it as it is now)."""
    target, path, sha = plugin_parts(spec)
    file = plugin_file(target)
    if file is not None:
        file = Path(os.path.abspath(file))
        target = f"{file}:{target.rpartition(':')[2]}"
    spec = target + (f"@{os.path.abspath(path)}" if path else "")
    if file is None or not file.is_file():  # a missing file is named when the plug-in is checked
        return spec + (f"{PLUGIN_PIN}{sha}" if sha else "")
    now = file_sha256(file)
    if sha is not None and sha != now:
        raise SettingError(f"--reward-plugin {name}: {file} has changed since it was recorded (sha256 "
                           f"{sha[:12]}... recorded, {now[:12]}... now): name it again (--reward-plugin "
                           f"{name}={spec}) to use it as it is now")  # fmt: skip
    return f"{spec}{PLUGIN_PIN}{now}"


MODEL_PATH_OPTIONS = ("base", "config")  # reward-model options that name local paths (videoalign, hpsv3)


def absolute_option(key: str, value, models: dict) -> Any:
    """A model's ``NAME.base`` / ``NAME.config`` made absolute (like its --reward-path), others as given."""
    name, _, opt = key.partition(".")
    if name in models and opt in MODEL_PATH_OPTIONS and isinstance(value, str) and value:
        return os.path.abspath(value)
    return value


PromptSet = Literal["held-in", "held-out"]


class RoutingSection(Section):
    """KV routing (``--fork kv-routing``, KVPO's exploration; defaults from KVPO's train_kvpo_longlive.yaml)."""

    kv_history: int = arg(21, "kv-routing: extra ring slots keeping older frames resident (repo slice_last_frames).")
    m_nearest: int = arg(4, "kv-routing: newest frames every branch keeps (its own chunk included).")
    perturb_blocks: int = arg(5, "kv-routing: consecutive routed chunks (repo perturb_num_blocks).")
    perturb_first: int = arg(7, "kv-routing: the first routed chunk lies among chunks 0..this-1.")

    def routing_settings(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in RoutingSection.model_fields}


class PromptSection(Section):
    """Prompts"""

    prompts: tuple[str, ...] | None = arg(None, "Prompt file, one per line (default: the world's --prompt-set).",
                                          lines=True)  # fmt: skip
    prompt_set: PromptSet = arg("held-in", "The world's prompt set when no file is given.")


class EvalPromptSection(PromptSection):
    """Prompts"""

    prompt_set: PromptSet = arg("held-out", "The world's prompt set when no file is given.")


class Hardware(Section):
    """Hardware"""

    # one definition for every stage that runs a model (train, collect, evaluate, merge, generate, demo,
    # experiments); models/placement.py turns it into a torch device and dtype
    device: str = arg("auto", "auto (cuda:LOCAL_RANK if available, else cpu) | cpu | cuda[:N].")
    dtype: DtypeName = arg("auto", "Compute dtype of generator, text encoder and VAE: auto (bf16 on CUDA, "
                           "fp32 on CPU) | fp32 | bf16 | fp16.")  # fmt: skip
    text_offload: TextOffload = arg("auto", "Text encoder after encoding: keep | cpu (moved off the device) "
                                    "| free (weights dropped) | auto (cpu when > 10% of the device).")  # fmt: skip
    threads: int | None = arg(None, "torch CPU threads.")
    # models/compiled.py: each block's two regions around its cache attention, one graph per batch shape
    compile: bool = arg(False, "torch.compile the generator's transformer blocks (inductor; the first forward "
                        "of each batch shape compiles, graphs are reused across chunks).")  # fmt: skip

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "cuda" or (v.startswith("cuda:") and v[5:].isdigit())):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {v!r}")
        return v


class ResultsOut(Section):
    """Results"""

    # the experiments' measured tables as data: docs/*.md tables are rendered from results/*.json
    json_out: str | None = arg(None, "Also write the result tables as JSON to this file (e.g. results/NAME.json, "
                               "which docs tables are rendered from: python bench/render_results.py).")  # fmt: skip

    @field_validator("json_out")
    @classmethod
    def _file(cls, v: str | None) -> str | None:
        if v is not None and Path(v).is_dir():
            raise ValueError(f"--json-out {v} is a folder: give a file name, e.g. {Path(v) / 'result.json'}")
        return v
