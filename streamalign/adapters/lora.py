"""LoRA adapters on the generator via peft: attach, save (peft format), load for more training.

Targets are Linear layers by name suffix: ``q, k, v, o`` (self- and cross-attention) and ``ffn.0,
ffn.2`` of every block. Saved adapters are peft folders (``adapter_config.json`` +
``adapter_model.safetensors``) that ``PeftModel.from_pretrained`` loads on our model and that
``load_generator(..., lora=folder)`` merges exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io.files import staged_folder
from ..models.checkpoint import ADAPTER_CONFIG, lora_pairs, read_adapter
from ..models.protocol import ChunkModel

if TYPE_CHECKING:  # peft is imported where it is used: run configs (LoraSettings) load without it
    from peft import PeftModel


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] | None = None  # module-name suffixes (default: the model's lora_targets)

    def check(self) -> None:
        if not 1 <= self.rank <= 4096:
            raise ValueError(f"--lora-rank {self.rank} must lie in 1..4096")
        if self.alpha <= 0:
            raise ValueError(f"--lora-alpha {self.alpha} must be > 0")


def attach_lora(model: ChunkModel, settings: LoraSettings, seed: int = 0) -> PeftModel:
    """Wrap `model` with a fresh trainable LoRA (A: peft's Kaiming init drawn from `seed`, B = 0, so the
    adapted model starts equal to the base). Only the LoRA weights require grad."""
    from peft import LoraConfig, get_peft_model

    settings.check()
    cfg = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets or model.lora_targets),
        lora_dropout=0.0,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, cfg)
    finally:
        torch.random.set_rng_state(state)
    return peft_model


def load_lora(model: ChunkModel, folder: str | Path, trainable: bool = True) -> PeftModel:
    """An adapter folder on `model`; clear error if its weights do not fit this model's layers."""
    lora_pairs(model, read_adapter(folder)[1])  # validates names and shapes against this model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def save_lora(peft_model: PeftModel, folder: str | Path) -> Path:
    """Save the adapter in peft format atomically: written to a temp folder, then renamed into place."""
    with staged_folder(folder) as tmp:
        # no embedding layer is adapted: saying so keeps peft from looking the base (a file) up on the Hub
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        config = tmp / ADAPTER_CONFIG  # peft writes target_modules from a set: sort it so the bytes repeat
        data = json.loads(config.read_text())
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True))
    return Path(folder)


def lora_parameters(peft_model: PeftModel) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA parameters in a fixed (module) order."""
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def cast_lora_inputs(peft_model: PeftModel, enabled: bool) -> None:
    """Whether peft casts every adapted layer's input to the LoRA weights' dtype (float32) before the LoRA
    factors. Under autocast the factors compute in the autocast dtype either way, so the cast only adds a
    float32 copy of each adapted layer's input to the activations (off: the same numbers, less memory)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled
