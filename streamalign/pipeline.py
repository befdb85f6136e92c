"""The one assembler: a model config -> generator (base weights + optional LoRA) + text encoder + latent
codec + sampler, with a stable policy id, and the one function that generates videos for (prompt, seed).

The config names every component (``text.kind``, ``codec.kind``, the default ``checkpoint``); a built-in
world such as ``shapes`` is a preset of it. Wan models need a local Diffusers-format Wan2.1 folder with
the UMT5 encoder and the VAE (``wan_dir``, or ``text.path`` / ``codec.path`` in the config).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .io import hub
from .io.files import checksum, require_paths
from .models.checkpoint import load_generator, shipped_lora
from .models.codec import LatentCodec, PixelUnshuffleCodec, WanVAECodec
from .models.compiled import compile_blocks, is_compiled
from .models.kv_cache import KVCache, compute_dtype
from .models.placement import CPU_FP32, Placement
from .models.protocol import ChunkModel
from .models.sampler import Sampler, Segment
from .models.text import MiniLMTextEncoder, TextEncoder, UMT5TextEncoder
from .schemas.config import ModelConfig
from .schemas.sections import ModelSection


@cache
def minilm(max_len: int) -> MiniLMTextEncoder:
    """One shared MiniLM encoder per token length (loading takes ~1 s). It is the built-in world's fixed
    22M-parameter encoder: float32 on the CPU whatever the generator's device and dtype."""
    return MiniLMTextEncoder.from_pretrained(max_len=max_len)


@cache
def _umt5(path: str, max_len: int, dtype: torch.dtype, device: torch.device, offload: str) -> UMT5TextEncoder:
    return UMT5TextEncoder.from_pretrained(path, max_len=max_len, dtype=dtype, device=device, offload=offload)


@cache
def _wan_vae(path: str, dtype: torch.dtype, device: torch.device) -> WanVAECodec:
    return WanVAECodec.from_pretrained(path, dtype=dtype, device=device)


def build_text(cfg: ModelConfig, placement: Placement = CPU_FP32) -> TextEncoder:
    """The config's text encoder, one per process for the same files, dtype, device and offload (a merge
    sweep or an evaluation of several models loads it once)."""
    if cfg.text.kind == "minilm":
        return minilm(cfg.arch.text_len)
    if cfg.text.path is None:
        raise ValueError(f"config {cfg.name!r} needs --wan-dir (local Diffusers Wan2.1 folder: UMT5 + VAE)")
    p = placement
    return _umt5(str(Path(cfg.text.path).resolve()), cfg.arch.text_len, p.dtype, p.device, p.text_offload)


def build_codec(cfg: ModelConfig, placement: Placement = CPU_FP32) -> LatentCodec:
    """The config's latent codec (the Wan VAE in the compute dtype, one per process for the same files)."""
    if cfg.codec.kind == "pixel-unshuffle":
        s = math.isqrt(cfg.latent.channels // 3)
        if 3 * s * s != cfg.latent.channels:
            raise ValueError(f"config {cfg.name!r}: latent channels {cfg.latent.channels} are not 3*s^2 "
                             "(the pixel-unshuffle codec needs them)")  # fmt: skip
        return PixelUnshuffleCodec(spatial=s, temporal=1)
    if cfg.codec.path is None:
        raise ValueError(f"config {cfg.name!r} needs --wan-dir (local Diffusers Wan2.1 folder: UMT5 + VAE)")
    return _wan_vae(str(Path(cfg.codec.path).resolve()), placement.dtype, placement.device)


def resolve_config(config: str | ModelConfig, wan_dir: str | Path | None = None) -> ModelConfig:
    """The config by name/path, with ``wan_dir`` (when given) as the folder of both text encoder and VAE;
    ``hf://`` ids among those folders resolved to the local cache (:mod:`streamalign.io.hub`)."""
    cfg = ModelConfig.load(config) if isinstance(config, str | Path) else config
    if wan_dir is not None:
        cfg = cfg.with_overrides(text={"path": str(wan_dir)}, codec={"path": str(wan_dir)})
    if hub.is_hub_id(cfg.text.path) or hub.is_hub_id(cfg.codec.path):  # the files as the cache holds them
        cfg = cfg.with_overrides(text={"path": hub.local(cfg.text.path)}, codec={"path": hub.local(cfg.codec.path)})
    return cfg


def base_checkpoint(cfg: ModelConfig, checkpoint: str | Path | None = None) -> str | Path:
    """The generator weights to load: `checkpoint`, else the config's default; a clear error otherwise."""
    if checkpoint is not None:
        return checkpoint
    if cfg.checkpoint is not None:
        return cfg.checkpoint
    w = cfg.weights
    where = f" ({w.file} of the Hugging Face repo {w.repo})" if w.repo and w.file else ""
    raise ValueError(f"config {cfg.name!r} needs --checkpoint (local generator weights{where})")


def describe_policy(checkpoint: str | Path, base_lora: str | Path | None = None,
                    base_lora_alpha: float | None = None) -> str:  # fmt: skip
    """The base policy in words, as adapters record it (``base_model_name_or_path``): the checkpoint's
    absolute path, plus the shipped LoRA and its alpha when one is merged."""
    text = os.path.abspath(checkpoint)
    if base_lora is not None:
        alpha = "" if base_lora_alpha is None else f" (alpha {base_lora_alpha:g})"
        text += f" + LoRA {os.path.abspath(base_lora)}{alpha}"
    return text


@dataclass
class Pipeline:
    """Generator + text encoder + codec of one policy. Videos are [B, F, 3, H, W] in [0, 1] (or uint8
    levels where only media need them) on `video_device`: decoded frames leave the accelerator as they
    are decoded (the memory planner points it at the meta device, its stand-in for the host)."""

    config: ModelConfig
    model: ChunkModel
    text: TextEncoder
    codec: LatentCodec
    policy_id: str
    video_device: str | torch.device = "cpu"

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.model, self.config)

    def decode(self, latents: torch.Tensor, uint8: bool = False) -> torch.Tensor:
        """Latents [B, F, C, h, w] -> videos [B, F', 3, H, W] on `video_device`, in [0, 1] or uint8 levels
        (decoded one video at a time by the Wan VAE codec)."""
        return self.codec.decode(latents, device=self.video_device, uint8=uint8)

    def decode_scenes(self, latents: torch.Tensor, runs: Sequence[int], uint8: bool = False) -> torch.Tensor:
        """Decode a multi-scene video's latents [B, F, C, h, w] run by run: `runs` are the latent frames
        between hard cuts (summing to F), each decoded on its own so that no codec (the Wan VAE is causal
        in time) carries anything across a cut. Returns the runs' frames concatenated, [B, F', 3, H, W]."""
        if sum(runs) != latents.shape[1]:
            raise ValueError(f"scene runs {list(runs)} do not add up to the {latents.shape[1]} latent frames")
        parts, start = [], 0
        for n in runs:
            parts.append(self.decode(latents[:, start : start + n], uint8))
            start += n
        return torch.cat(parts, dim=1)

    @property
    def placement(self) -> Placement:
        """The generator's device and compute dtype (and the text encoder's offload policy)."""
        offload = getattr(self.text, "offload", "auto")
        return Placement(next(self.model.parameters()).device, compute_dtype(self.model), offload,
                         is_compiled(self.model))  # fmt: skip

    @classmethod
    def load(
        cls,
        config: str | ModelConfig,
        checkpoint: str | Path | None = None,
        lora: str | Path | None = None,
        lora_alpha: float | None = None,
        wan_dir: str | Path | None = None,
        placement: Placement = CPU_FP32,
        base_lora: str | Path | None = None,
        base_lora_alpha: float | None = None,
        shard: Callable[[ChunkModel], None] | None = None,
    ) -> Pipeline:
        """Generator (weights straight into the placement's dtype and device; the config's shipped LoRA
        `base_lora` merged, then the adapter `lora`; with `shard`, each rank's shard of them, see
        :func:`~streamalign.models.checkpoint.load_generator`), text encoder and codec."""
        cfg = resolve_config(config, wan_dir)
        checkpoint, lora = hub.local(base_checkpoint(cfg, checkpoint)), hub.local(lora)
        base_lora = hub.local(shipped_lora(cfg, base_lora))
        require_paths((checkpoint, "checkpoint"), (base_lora, "base LoRA"), (lora, "LoRA adapter"),
                      (wan_dir, "Wan folder"))  # fmt: skip
        model = load_generator(cfg, checkpoint, lora=lora, lora_alpha=lora_alpha, dtype=placement.dtype,
                               device=placement.device, base_lora=base_lora, base_lora_alpha=base_lora_alpha,
                               shard=shard)  # fmt: skip
        if placement.compile:  # graphs are built at the first forwards, so adapters attached later are in them
            compile_blocks(model)
        pid = policy_id(checkpoint, lora, lora_alpha, base_lora, base_lora_alpha)
        return cls(cfg, model, build_text(cfg, placement), build_codec(cfg, placement), pid)

    @classmethod
    def of_section(
        cls, model: ModelSection, placement: Placement = CPU_FP32, lora: str | Path | None = None,
        lora_alpha: float | None = None, config: ModelConfig | None = None,
        shard: Callable[[ChunkModel], None] | None = None,
    ) -> Pipeline:  # fmt: skip
        """The policy a stage's model section names (base weights + shipped LoRA, and its own ``--lora``
        when it has one, else `lora`) on `placement`; `config`: the section's config already resolved (e.g.
        with another cache policy); `shard`: as :meth:`load`'s."""
        lora, lora_alpha = getattr(model, "lora", None) or lora, getattr(model, "lora_alpha", None) or lora_alpha
        return cls.load(config or model.config, model.checkpoint, lora, lora_alpha, model.wan_dir, placement,
                        model.base_lora, model.base_lora_alpha, shard)  # fmt: skip

    @classmethod
    def of_model(
        cls, config: str | ModelConfig, model: ChunkModel, policy_id: str = "in-memory", text_offload: str = "auto"
    ) -> Pipeline:
        """The config's text encoder and codec around a generator already in memory (e.g. during training),
        on its device and in its compute dtype."""
        cfg = resolve_config(config)
        placement = Placement(next(model.parameters()).device, compute_dtype(model), text_offload)
        return cls(cfg, model, build_text(cfg, placement), build_codec(cfg, placement), policy_id)

    @classmethod
    def from_weights(
        cls, config: str | ModelConfig, weights: str | Path | None, placement: Placement = CPU_FP32
    ) -> Pipeline:
        """A pipeline of given generator weights (None: random initialisation)."""
        cfg = resolve_config(config)
        pid = policy_id(weights) if weights is not None else "random"
        model = load_generator(cfg, weights, dtype=placement.dtype, device=placement.device)
        if placement.compile:
            compile_blocks(model)
        return cls.of_model(cfg, model, pid, placement.text_offload)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        batch: int | None = None,
        num_chunks: int | None = None,
        uint8: bool = False,
    ) -> torch.Tensor:
        """One video per (prompt, seed) with the few-step sampler, noise from the seed: [N, F, 3, H, W] on
        `video_device`. Rollouts run `batch` videos at a time (default: as many as the device memory allows,
        at most 64, see :meth:`Sampler.auto_batch`); `uint8`: frames as 8-bit levels (media only)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        sampler = self.sampler
        batch = batch or sampler.auto_batch(len(prompts), num_chunks)
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(prompts), batch):
            ctx = self.text.encode(list(prompts[i : i + batch]))
            latents = sampler.rollout(ctx, sampler.noise_bank(list(seeds[i : i + batch])), num_chunks)
            out.append(self.decode(latents, uint8))
        self.model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def generate_scenes(
        self, scenes: Sequence[tuple[str, int, bool]], seed: int, cache: KVCache | None = None
    ) -> torch.Tensor:
        """One video [F, 3, H, W] in [0, 1] from a scene plan (prompt, chunks, hard_cut); noise from `seed`,
        addressed by the global chunk index; `cache` (e.g. a rolling one) for long videos. Each run of
        scenes between hard cuts is decoded on its own (:meth:`decode_scenes`)."""
        self.model.eval()
        segments = [Segment(self.text.encode([p]), n, cut) for p, n, cut in scenes]
        sampler = self.sampler
        latents = sampler.generate(segments, sampler.noise_bank([seed]), cache, final_refresh=False)  # video only
        runs: list[int] = []
        for k, (_, n, cut) in enumerate(scenes):
            if k == 0 or cut:
                runs.append(0)
            runs[-1] += n * sampler.chunk_frames
        return self.decode_scenes(latents, runs)[0]


def policy_id(checkpoint: str | Path, lora: str | Path | None = None, lora_alpha: float | None = None,
              base_lora: str | Path | None = None, base_lora_alpha: float | None = None) -> str:  # fmt: skip
    """16 hex digits of sha256 over the weights' checksums (the base's, and the LoRA's with its alpha; a
    shipped LoRA's, with its alpha, after them: ids of policies without one are those they always were)."""
    h = hashlib.sha256()
    for p in (checkpoint, lora):
        if p is not None:
            h.update(checksum(Path(hub.local(p))).encode())
    h.update(repr(lora_alpha).encode())
    if base_lora is not None:
        h.update(b"base-lora" + checksum(Path(base_lora)).encode() + repr(base_lora_alpha).encode())
    return h.hexdigest()[:16]
