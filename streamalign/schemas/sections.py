"""Run-config sections shared by several stages: the model, a policy (model + adapter), prompts, rewards."""

from __future__ import annotations

from typing import Literal

from .run import Section, arg


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
