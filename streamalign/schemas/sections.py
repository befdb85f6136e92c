"""Run-config sections shared by several stages: the model, a policy (model + adapter), prompts, rewards,
the hardware a stage runs on (device, compute dtype, text-encoder offload, CPU threads)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from .run import Section, arg

# a dtype by name: "auto" is the compute dtype (bf16 on CUDA, fp32 on CPU); see models/placement.py
DtypeName = Literal["auto", "fp32", "bf16", "fp16"]
TextOffload = Literal["auto", "keep", "cpu", "free"]


class ModelSection(Section):
    """Model"""

    config: str = arg("shapes", "Model config: preset name or YAML path.", short="-c")
    checkpoint: str | None = arg(None, "Generator weights (default: the config's, e.g. the shipped shapes weights).")
    wan_dir: str | None = arg(None, "Local Diffusers Wan2.1 folder (UMT5 + VAE).")


class PolicySection(ModelSection):
    """Model"""

    lora: str | None = arg(None, "LoRA adapter (peft folder or LongLive file) merged into the model.")
    lora_alpha: float | None = arg(None, "LoRA alpha (default: adapter config, else rank).")


class RewardSection(Section):
    """Rewards"""

    rewards: str | None = arg(None, "Composite: name[:topNN][:gray]=weight,... (default: the world's).")
    metrics: str | None = arg(None, "OOD metrics stored alongside, comma-separated (default: the world's).")


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
