"""A policy = generator (base weights + optional LoRA) + text encoder + latent codec, with a stable id.

The shapes world's policy comes from the package (``config="shapes"``, the shipped weights by default).
Wan models need ``wan_dir``: a local Diffusers-format Wan2.1 folder with the UMT5 encoder and the VAE.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..buffer.formats import checksum
from ..models.checkpoint import load_generator
from ..models.codec import LatentCodec, WanVAECodec
from ..models.sampler import Sampler
from ..models.text import TextEncoder, UMT5TextEncoder
from ..models.wan import CausalWanModel
from ..schemas.config import ModelConfig


@dataclass
class Policy:
    config: ModelConfig
    model: CausalWanModel
    text: TextEncoder
    codec: LatentCodec
    policy_id: str

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.model, self.config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, F, C, h, w] -> videos [B, F', 3, H, W] in [0, 1]."""
        return self.codec.decode(latents)

    @classmethod
    def load(
        cls,
        config: str | ModelConfig,
        checkpoint: str | Path | None = None,
        lora: str | Path | None = None,
        lora_alpha: float | None = None,
        wan_dir: str | Path | None = None,
        device: str = "cpu",
    ) -> Policy:
        from ..models.shapes.pipeline import codec_for, minilm

        cfg = ModelConfig.load(config) if isinstance(config, str) else config
        shapes = cfg.arch.text_dim == 384 and wan_dir is None
        checkpoint = base_checkpoint(cfg, checkpoint, wan_dir)
        for p, what in ((checkpoint, "checkpoint"), (lora, "LoRA adapter"), (wan_dir, "Wan folder")):
            if p is not None and not Path(p).exists():
                raise FileNotFoundError(f"{what} {p} does not exist")
        model = load_generator(cfg, checkpoint, lora=lora, lora_alpha=lora_alpha, device=device)
        if shapes:
            text, codec = minilm(cfg.arch.text_len), codec_for(cfg)
        elif wan_dir is not None:
            text = UMT5TextEncoder.from_pretrained(wan_dir, max_len=cfg.arch.text_len, device=device)
            codec = WanVAECodec.from_pretrained(wan_dir, device=device)
        else:
            raise ValueError(f"config {cfg.name!r} needs --wan-dir (local Diffusers Wan2.1 folder: UMT5 + VAE)")
        return cls(cfg, model, text, codec, policy_id(checkpoint, lora, lora_alpha))


def base_checkpoint(cfg: ModelConfig, checkpoint: str | Path | None, wan_dir: str | Path | None = None) -> str | Path:
    """The generator weights to load: `checkpoint`, else the shipped weights for a shapes-arch config
    (shapes, shapes-long) without a Wan folder; a clear error otherwise."""
    from ..models.shapes.pipeline import SHIPPED_WEIGHTS

    if checkpoint is not None:
        return checkpoint
    if cfg.arch.text_dim == 384 and wan_dir is None and cfg.arch == ModelConfig.load("shapes").arch:
        return SHIPPED_WEIGHTS
    raise ValueError(f"config {cfg.name!r} needs --checkpoint (local generator weights)")


def policy_id(checkpoint: str | Path, lora: str | Path | None = None, lora_alpha: float | None = None) -> str:
    """16 hex digits of sha256 over the weights' checksums (the base's, and the LoRA's with its alpha)."""
    h = hashlib.sha256()
    for p in (checkpoint, lora):
        if p is not None:
            h.update(checksum(Path(p)).encode())
    h.update(repr(lora_alpha).encode())
    return h.hexdigest()[:16]
