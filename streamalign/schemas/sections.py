"""Run-config sections shared by several stages: the model, a policy (model + adapter), prompts, rewards,
the hardware a stage runs on (device, compute dtype, text-encoder offload, CPU threads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from ..io.hub import is_hub_id
from .run import RUN_FILE, Section, arg, parse_pairs, read_run_file

# a dtype by name: "auto" is the compute dtype (bf16 on CUDA, fp32 on CPU); see models/placement.py
DtypeName = Literal["auto", "fp32", "bf16", "fp16"]
TextOffload = Literal["auto", "keep", "cpu", "free"]


class ModelSection(Section):
    """Model"""

    config: str = arg("shapes", "Model config: preset name or YAML path.", short="-c")
    checkpoint: str | None = arg(None, "Generator weights, a path or hf://ORG/REPO[@REV]/FILE (default: the "
                                 "config's, e.g. the shipped shapes weights).")  # fmt: skip
    wan_dir: str | None = arg(None, "Diffusers Wan2.1 folder (UMT5 + VAE), a path or hf://ORG/REPO[@REV].")


class PolicySection(ModelSection):
    """Model"""

    lora: str | None = arg(None, "LoRA adapter (peft folder or LongLive file) merged into the model.")
    lora_alpha: float | None = arg(None, "LoRA alpha (default: adapter config, else rank).")


class RewardSection(Section):
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

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("rewards_from"):
                data = {**data, "rewards_from": os.path.abspath(data["rewards_from"])}
                for key, value in recorded_rewards(data["rewards_from"]).items():
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
                data["reward_plugins"] = {k: absolute_plugin(v) for k, v in data["reward_plugins"].items()}
            if isinstance(data.get("reward_options"), dict) and isinstance(data.get("reward_paths"), dict):
                data["reward_options"] = {k: absolute_option(k, v, data["reward_paths"])
                                          for k, v in data["reward_options"].items()}  # fmt: skip
        return data


REWARD_FIELDS = ("rewards", "metrics", "reward_paths", "reward_options", "reward_plugins", "reward_device")


def recorded_rewards(path: str | Path) -> dict[str, Any]:
    """The reward fields recorded in a run's ``run.yaml`` (a buffer's: collect; a train run's: rollouts;
    an evaluation's: eval), given the file or its folder."""
    file = Path(path) / RUN_FILE if Path(path).is_dir() else Path(path)
    config = read_run_file(file)
    for section in config.values():
        if isinstance(section, dict) and section.get("rewards"):
            return {k: section[k] for k in REWARD_FIELDS if k in section}
    raise ValueError(f"--rewards-from {path}: {file} records no rewards (give a buffer or a run folder)")


MODEL_PATH_OPTIONS = ("base", "config")  # reward-model options that name local paths (videoalign, hpsv3)


def absolute_option(key: str, value, models: dict) -> Any:
    """A model's ``NAME.base`` / ``NAME.config`` made absolute (like its --reward-path), others as given."""
    name, _, opt = key.partition(".")
    if name in models and opt in MODEL_PATH_OPTIONS and isinstance(value, str) and value:
        return os.path.abspath(value)
    return value


def absolute_plugin(spec: str) -> str:
    """``file.py:factory[@PATH]`` with both paths absolute (a ``module:factory`` keeps its module name)."""
    target, at, path = str(spec).partition("@")
    module, colon, attr = target.rpartition(":")
    if colon and module.endswith(".py"):
        target = f"{os.path.abspath(module)}:{attr}"
    return target + (f"@{os.path.abspath(path)}" if at and path else "")


PromptSet = Literal["held-in", "held-out"]


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
