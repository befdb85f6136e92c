"""What the sampler, the KV cache, the pivot replay and LoRA need of a chunk-autoregressive generator, and
the registry of model families (a family = a model class + its checkpoint key adapter + YAML presets).

Adding a family: write the model file (a module satisfying :class:`ChunkModel`), a key adapter that maps
checkpoint keys to the model's state-dict keys, ``register_family(ModelFamily(...))`` at its bottom, and a
preset YAML with ``arch: {family: NAME, ...}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from ..registry import Registry
from ..schemas.config import ArchConfig

if TYPE_CHECKING:
    from .kv_cache import KVCache

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING_PREFIXES = ("module.", "model.", "diffusion_model.", "base_model.model.")


class ChunkModel(Protocol):
    """A generator run chunk by chunk through a KV cache.

    ``arch``: its hyper-parameters; ``arch.prediction`` says what the head outputs (``flow`` v = noise - x0,
    or ``x0``), and ``num_layers`` / ``num_heads`` / ``head_dim`` are the KV spec (per layer k, v
    ``[B, S, heads, head_dim]``). ``lora_targets``: the module-name suffixes LoRA adapts by default."""

    arch: ArchConfig
    lora_targets: tuple[str, ...]

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, cache: KVCache | None = None,
        start_frame: int = 0, chunk_frames: int | None = None, sink: int = 0, window: int | None = None,
        positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """x [B, F, C, H, W] latents at per-frame timesteps t [B, F] -> the head's prediction [B, F, C, H, W]."""
        ...

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """[B, L, text_dim] encoder output -> the cross-attention context [B, text_len, dim]."""
        ...


def normalize_key(key: str) -> str:
    """Drop trainer wrapper segments anywhere (FSDP, checkpointing, compile) and known leading prefixes."""
    for seg in WRAPPER_SEGMENTS:
        key = key.replace(seg, "")
    changed = True
    while changed:
        changed = False
        for p in LEADING_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


@dataclass(frozen=True)
class ModelFamily:
    name: str
    build: Callable[[ArchConfig], torch.nn.Module]  # arch -> the model (randomly initialised)
    key_adapter: Callable[[str], str] = normalize_key  # checkpoint key -> the model's state-dict key


FAMILIES: Registry[ModelFamily] = Registry("models", "model family", "model families")


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` the builder of configs with ``arch.family: NAME`` (plug-ins: entry-point group
    ``streamalign.models``, see :mod:`streamalign.registry`)."""
    return FAMILIES.register(family.name, family)


def get_family(name: str) -> ModelFamily:
    return FAMILIES.get(name)
