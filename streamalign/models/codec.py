"""Latent codecs behind one interface: videos ``[B, F, 3, H, W]`` in [0, 1] <-> latents ``[B, f, C, h, w]``.

- :class:`WanVAECodec`: Wan2.1's VAE (``diffusers.AutoencoderKLWan``) from a local Diffusers-format folder,
  with the per-channel latent normalisation ``z_norm = (z - mean) / std`` of Self-Forcing/Wan
  (4x temporal: F = 4 (f - 1) + 1; 8x spatial).
- :class:`PixelUnshuffleCodec`: an exact, parameter-free codec for the built-in world: each latent pixel
  holds an ``s x s`` patch of `k` consecutive frames, values mapped to [-1, 1] (C = 3 s^2 k).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F


class LatentCodec(Protocol):
    latent_channels: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class WanVAECodec:
    temporal = 4  # video frames per latent frame (after the first)

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = int(cfg.z_dim)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> WanVAECodec:
        """Load ``path/vae`` (a Diffusers-format Wan2.1 folder) or ``path`` itself if it is the vae folder."""
        from diffusers import AutoencoderKLWan

        root = Path(path)
        folder = root / "vae" if (root / "vae").is_dir() else root
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"no AutoencoderKLWan config.json under {root} (expected {root}/vae/config.json)")
        vae = AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
        return cls(vae.to(device))

    def _param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [0, 1] -> normalised latents [B, f, 16, H/8, W/8] (posterior mean)."""
        p = self._param()
        x = (video * 2 - 1).transpose(1, 2).to(p.device, p.dtype)
        z = self.vae.encode(x).latent_dist.mode().float()
        z = (z - self.mean.to(z.device)) / self.std.to(z.device)
        return z.transpose(1, 2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, f, 16, h, w] -> video [B, F, 3, 8h, 8w] in [0, 1]."""
        p = self._param()
        z = latents.transpose(1, 2).float()
        z = z * self.std.to(z.device) + self.mean.to(z.device)
        x = self.vae.decode(z.to(p.device, p.dtype)).sample.float().clamp(-1, 1)
        return (x.transpose(1, 2) + 1) / 2


class PixelUnshuffleCodec:
    def __init__(self, spatial: int = 2, temporal: int = 1) -> None:
        self.spatial, self.temporal = spatial, temporal
        self.latent_channels = 3 * spatial * spatial * temporal

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, F, 3, H, W] in [0, 1] (F divisible by `temporal`) -> [B, F/k, 3 s^2 k, H/s, W/s] in [-1, 1]."""
        b, f, c, h, w = video.shape
        k, s = self.temporal, self.spatial
        if f % k or h % s or w % s:
            raise ValueError(f"video {f}x{h}x{w} is not divisible by codec factors {k}x{s}x{s}")
        x = F.pixel_unshuffle((video * 2 - 1).reshape(b * f, c, h, w), s)  # [B*F, 3 s^2, h/s, w/s]
        return x.reshape(b, f // k, k * x.shape[1], h // s, w // s)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode`, clamped to [0, 1]."""
        b, f, c, h, w = latents.shape
        k, s = self.temporal, self.spatial
        x = F.pixel_shuffle(latents.reshape(b * f * k, c // k, h, w), s)
        return ((x.reshape(b, f * k, 3, h * s, w * s) + 1) / 2).clamp(0, 1)
