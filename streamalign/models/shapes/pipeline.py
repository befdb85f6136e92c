"""The shapes world as explicit components: model config, generator, MiniLM text encoder, pixel codec.

``ShapesWorld.from_pretrained()`` loads the shipped generator; ``generate(prompts, seeds)`` is the
sampler's rollout decoded to pixels [B, F, 3, 32, 32] in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from ...schemas.config import ModelConfig
from ..checkpoint import load_generator
from ..codec import PixelUnshuffleCodec
from ..sampler import Sampler
from ..text import MiniLMTextEncoder
from ..wan import CausalWanModel

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_WEIGHTS = ASSETS / "shapes.safetensors"


def codec_for(config: ModelConfig) -> PixelUnshuffleCodec:
    """The pixel-unshuffle codec whose 3 s^2 channels match the config's latent channels."""
    s = math.isqrt(config.latent.channels // 3)
    if 3 * s * s != config.latent.channels:
        raise ValueError(f"latent channels {config.latent.channels} are not 3*s^2: not a shapes-world config")
    return PixelUnshuffleCodec(spatial=s, temporal=1)


@cache
def minilm(max_len: int) -> MiniLMTextEncoder:
    """One shared MiniLM encoder per token length (loading takes ~1 s)."""
    return MiniLMTextEncoder.from_pretrained(max_len=max_len)


class ShapesWorld:
    """Generator + text encoder + codec of the shapes world. Videos are [B, F, 3, H, W] in [0, 1]."""

    def __init__(self, config: ModelConfig, model: CausalWanModel) -> None:
        self.config = config
        self.model = model.eval()
        self.codec = codec_for(config)
        self.text = minilm(config.arch.text_len)
        self.sampler = Sampler(model, config)

    @classmethod
    def from_pretrained(
        cls, weights: str | Path | None = SHIPPED_WEIGHTS, config: str | ModelConfig = "shapes", device: str = "cpu"
    ) -> ShapesWorld:
        """The shipped generator by default; another checkpoint by path; random weights with None."""
        cfg = ModelConfig.load(config) if isinstance(config, str) else config
        return cls(cfg, load_generator(cfg, weights, device=device))

    @property
    def video_size(self) -> int:
        return self.config.latent.height * self.codec.spatial

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """MiniLM token embeddings [B, text_len, 384] (zero at padding)."""
        return self.text.encode(list(prompts))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], num_chunks: int | None = None) -> torch.Tensor:
        """One video per (prompt, seed) with the 4-step sampler: [B, F, 3, H, W] in [0, 1]."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        ctx = self.encode_prompts(prompts)
        latents = self.sampler.rollout(ctx, self.sampler.noise_bank(list(seeds)), num_chunks)
        return self.codec.decode(latents)
