"""Latent codecs behind one interface: videos ``[B, F, 3, H, W]`` in [0, 1] <-> latents ``[B, f, C, h, w]``.

- :class:`WanVAECodec`: Wan2.1's VAE (``diffusers.AutoencoderKLWan``) from a local Diffusers-format folder,
  with the per-channel latent normalisation ``z_norm = (z - mean) / std`` of Self-Forcing/Wan
  (4x temporal: F = 4 (f - 1) + 1; 8x spatial). It decodes one video at a time, one latent frame at a
  time through the VAE's causal cache (exactly the frames of one whole-batch ``vae.decode``), and moves
  each slice of frames off the device as soon as it is decoded: the device holds one video's decoder
  state, never G decoded videos.
- :class:`PixelUnshuffleCodec`: an exact, parameter-free codec for the built-in world: each latent pixel
  holds an ``s x s`` patch of `k` consecutive frames, values mapped to [-1, 1] (C = 3 s^2 k).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..io.media import to_uint8
from .transfer import host_empty, pins, wait_for_copies


class LatentCodec(Protocol):
    latent_channels: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(
        self, latents: torch.Tensor, device: str | torch.device | None = None, uint8: bool = False
    ) -> torch.Tensor:
        """Latents -> videos on `device` (None: the latents' device), floats in [0, 1] or uint8 levels."""
        ...


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
    def decode(
        self, latents: torch.Tensor, device: str | torch.device | None = None, uint8: bool = False
    ) -> torch.Tensor:
        """Normalised latents [B, f, 16, h, w] -> video [B, F, 3, 8h, 8w] on `device` (None: the latents'
        device), in [0, 1] (or uint8 levels, :func:`~streamalign.io.media.to_uint8`). Video by video, latent
        frame by latent frame (:meth:`decode_slices`); the result equals one ``vae.decode`` of the batch.
        From a CUDA VAE to the host, each slice is copied into pinned memory without waiting, and the host
        waits once, for the whole batch."""
        out, target = None, torch.device(latents.device if device is None else device)
        for b, start, frames in self.decode_slices(latents):
            frames = to_uint8(frames) if uint8 else frames
            if out is None:
                b_, f = latents.shape[:2]
                shape = (b_, self.temporal * (f - 1) + 1, *frames.shape[1:])
                if target.type == "cpu":
                    out = host_empty(shape, frames.dtype, pinned=pins(frames.device))
                else:
                    out = torch.empty(shape, dtype=frames.dtype, device=target)
            out[b, start : start + frames.shape[0]].copy_(frames, non_blocking=True)
            del frames  # the next slice is decoded without this one on the device
        wait_for_copies(self._param().device)
        return out

    def decode_slices(self, latents: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (video index, first frame, frames [n, 3, H, W] in [0, 1] on the VAE's device) for latents
        [B, f, 16, h, w]: each video on its own, each latent frame through the decoder's causal feature
        cache (the first gives 1 frame, every later one `temporal`), as ``AutoencoderKLWan._decode`` runs
        them, without concatenating the video on the device. Spatial tiling, when enabled on the VAE
        (``enable_tiling``; approximate by design), decodes whole videos through ``vae.decode``."""
        p = self._param()
        vae = self.vae
        causal = all(hasattr(vae, a) for a in ("clear_cache", "post_quant_conv", "decoder"))  # diffusers' internals
        for b in range(latents.shape[0]):
            z = latents[b : b + 1].transpose(1, 2).float()
            z = z * self.std.to(z.device) + self.mean.to(z.device)
            z = z.to(p.device, p.dtype)
            if not causal or getattr(vae, "use_tiling", False):
                yield b, 0, self._to_unit(vae.decode(z).sample)
                continue
            patch = getattr(vae.config, "patch_size", None)
            vae.clear_cache()
            x = vae.post_quant_conv(z)
            start = 0
            for i in range(x.shape[2]):
                vae._conv_idx = [0]
                out = vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0)  # fmt: skip
                if patch is not None:
                    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                    out = unpatchify(out, patch_size=patch)
                frames = self._to_unit(out.clamp(-1.0, 1.0))
                yield b, start, frames
                start += frames.shape[0]
                del out, frames
            vae.clear_cache()

    @staticmethod
    def _to_unit(x: torch.Tensor) -> torch.Tensor:
        """VAE output [1, 3, n, H, W] in [-1, 1] -> frames [n, 3, H, W] in [0, 1] (float32)."""
        return (x.float().clamp(-1, 1).transpose(1, 2)[0] + 1) / 2


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

    def decode(
        self, latents: torch.Tensor, device: str | torch.device | None = None, uint8: bool = False
    ) -> torch.Tensor:
        """Inverse of :meth:`encode`, clamped to [0, 1] (or uint8 levels), on `device` (None: the latents')."""
        b, f, c, h, w = latents.shape
        k, s = self.temporal, self.spatial
        x = F.pixel_shuffle(latents.reshape(b * f * k, c // k, h, w), s)
        x = ((x.reshape(b, f * k, 3, h * s, w * s) + 1) / 2).clamp(0, 1)
        return (to_uint8(x) if uint8 else x).to(latents.device if device is None else device)
