"""Validated model configurations: architecture, sampler, latent geometry and KV-cache policy.

A config is data (YAML). Shipped presets live in ``streamalign/configs/models/NAME.yaml`` and are
loaded by name (``ModelConfig.load("wan-1.3b")``) or by path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchConfig(_Strict):
    """Hyper-parameters of the causal Wan2.1 DiT (names follow the Wan reference code)."""

    dim: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = Field(512, gt=0)
    text_dim: int = Field(4096, gt=0)
    freq_dim: int = Field(256, gt=0)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    family: str = "wan"  # the model family (models.protocol registry): which class and key adapter load it
    # What the head outputs: the flow v = noise - x0 (every Wan2.1 checkpoint) or x0 itself (the small
    # shapes generator: a tiny model cannot carry the input noise through to a v output).
    prediction: Literal["flow", "x0"] = "flow"

    @model_validator(mode="after")
    def _heads(self) -> ArchConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ValueError(f"head_dim {head_dim} must be even and >= 6 for 3-D RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim {self.freq_dim} must be even")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


class SamplerConfig(_Strict):
    """Few-step sampler: `chunk_frames` latent frames per chunk, DMD-style denoising steps."""

    chunk_frames: int = Field(3, gt=0)
    denoising_steps: tuple[int, ...] = (1000, 750, 500, 250)
    warp: bool = True
    shift: float = Field(5.0, gt=0)
    num_train_timesteps: int = Field(1000, gt=0)
    context_t: float = Field(0.0, ge=0)

    @field_validator("denoising_steps")
    @classmethod
    def _steps(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("denoising_steps is empty")
        if any(b >= a for a, b in itertools.pairwise(v)):
            raise ValueError(f"denoising_steps must be strictly decreasing, got {list(v)}")
        if v[-1] <= 0:
            raise ValueError("denoising_steps must be positive (the last step's x0 is the output)")
        return v


class LatentConfig(_Strict):
    """Latent video geometry [F, C, H, W] the model is used at (H, W in latent pixels)."""

    channels: int = Field(16, gt=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    frames: int = Field(gt=0)


class CacheConfig(_Strict):
    """KV-cache policy: ``window=None`` is a global cache; otherwise keep `sink` frames + `window` recent.

    LongLive's ``local_attn_size=12, sink_size=3`` is ``sink: 3, window: 9`` here.
    """

    sink: int = Field(0, ge=0)
    window: int | None = Field(None, gt=0)
    # Krea Realtime: before each block the K/V of the context (the previous block's 3 frames) are
    # recomputed from those frames alone, so the clean (t = context_t) pass that writes a chunk's K/V
    # attends to that chunk only; with ``window`` = 2 chunks a chunk then attends to that context + itself
    recompute_context: bool = False


class TextConfig(_Strict):
    """The text encoder: ``umt5`` (Wan2.1's UMT5-XXL from a local Diffusers-format Wan folder) or ``minilm``
    (all-MiniLM-L6-v2 shipped in a PyPI package, the built-in world's). ``path``: the local folder."""

    kind: Literal["umt5", "minilm"] = "umt5"
    path: str | None = None


class CodecConfig(_Strict):
    """The latent codec: ``wan-vae`` (Wan2.1's VAE from a local Diffusers-format Wan folder) or
    ``pixel-unshuffle`` (exact and parameter-free; its factor follows from the latent channels)."""

    kind: Literal["wan-vae", "pixel-unshuffle"] = "wan-vae"
    path: str | None = None


EntryName = Literal["auto", "generator", "generator_ema"]


class WeightsConfig(_Strict):
    """Where a named model's generator weights come from and how its file is laid out (documentation and
    the loader's choice of entry): the Hugging Face repository and file as published, the entry of a
    Self-Forcing style ``.pt`` the authors' inference loads, and the key prefix of its tensors (the loader
    strips every known prefix; a different one is a strict-load error naming the keys)."""

    repo: str | None = None  # Hugging Face repository (ORG/NAME)
    file: str | None = None  # path of the checkpoint in that repository
    entry: EntryName = "auto"  # which entry ``auto`` picks when the file has several
    key_prefix: str = ""  # prefix of the stored keys (e.g. ``model.``), informative


class ShippedLoraConfig(_Strict):
    """A LoRA the model is published with (LongLive): its file, entry, geometry and default alpha. The
    model is its base weights with this LoRA merged exactly (``W += (alpha / rank) B A``)."""

    repo: str | None = None
    file: str | None = None
    entry: str = "generator_lora"
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    targets: tuple[str, ...] = ()  # module-name suffixes the shipped LoRA adapts (empty: not checked)


class ModelConfig(_Strict):
    """Everything one pipeline is assembled from: the generator (arch + default weights), its sampler and
    latent geometry, the KV-cache policy, the text encoder, the codec, and (built-in worlds) the world
    whose prompts and rewards are the defaults. A named model's preset also says where its files come from
    (``weights``) and the LoRA it ships (``lora``)."""

    name: str
    arch: ArchConfig
    sampler: SamplerConfig = SamplerConfig()
    latent: LatentConfig
    cache: CacheConfig = CacheConfig()
    text: TextConfig = TextConfig()
    codec: CodecConfig = CodecConfig()
    checkpoint: str | None = None  # default generator weights; relative to the YAML file it is written in
    world: str | None = None  # a built-in world (``shapes``): default prompt sets and rewards
    weights: WeightsConfig = WeightsConfig()
    lora: ShippedLoraConfig | None = None  # the LoRA the model ships (merged into the base weights)

    @model_validator(mode="after")
    def _geometry(self) -> ModelConfig:
        pf, ph, pw = self.arch.patch_size
        lat = self.latent
        if lat.height % ph or lat.width % pw:
            raise ValueError(f"latent {lat.height}x{lat.width} is not divisible by patch {ph}x{pw}")
        if pf != 1:
            raise ValueError("only temporal patch size 1 is supported (as in Wan2.1)")
        if lat.frames % self.sampler.chunk_frames:
            raise ValueError(
                f"latent frames {lat.frames} is not a multiple of chunk_frames {self.sampler.chunk_frames}"
            )
        if lat.channels != self.arch.in_dim:
            raise ValueError(f"latent channels {lat.channels} != arch.in_dim {self.arch.in_dim}")
        w = self.cache.window
        if w is not None and w < self.sampler.chunk_frames:
            raise ValueError(f"cache window {w} is smaller than a chunk ({self.sampler.chunk_frames})")
        if not self.recomputes_within(self.cache.sink, w):
            raise ValueError(
                f"cache recompute_context needs sink 0 and window {2 * self.sampler.chunk_frames} (one chunk of "
                f"context + the chunk, as Krea's kv_cache_num_frames = num_frame_per_block), got sink "
                f"{self.cache.sink}, window {w}"
            )
        return self

    def recomputes_within(self, sink: int, window: int | None) -> bool:
        """False when the cache recomputes its context (``recompute_context``) and a cache of `sink` +
        `window` frames is not the one chunk of context + the chunk that recomputation is defined for."""
        return not self.cache.recompute_context or (sink == 0 and window == 2 * self.sampler.chunk_frames)

    @property
    def tokens_per_frame(self) -> int:
        _, ph, pw = self.arch.patch_size
        return (self.latent.height // ph) * (self.latent.width // pw)

    @property
    def num_chunks(self) -> int:
        return self.latent.frames // self.sampler.chunk_frames

    @property
    def arch_id(self) -> str:
        """Stable hash of the architecture (what a checkpoint or buffer must agree with)."""
        arch = self.arch.model_dump(mode="json", exclude={"family"} if self.arch.family == "wan" else set())
        blob = json.dumps(arch, sort_keys=True).encode()  # Wan ids predate the family field and stay valid
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def load(cls, name_or_path: str | Path) -> ModelConfig:
        """Load a preset by name (``wan-1.3b``, ``self-forcing``, ``tiny``) or a YAML file by path. A file
        may start from another config (``extends: NAME or PATH``) and give only the fields it changes."""
        return cls.model_validate(_config_data(name_or_path, ()))

    def with_overrides(self, **sections: dict) -> ModelConfig:
        """A copy with some fields of some sections replaced, e.g. ``latent={"frames": 42}``."""
        data = self.model_dump()
        for section, values in sections.items():
            if isinstance(values, dict):
                data[section] = {**data[section], **values}
            else:
                data[section] = values
        return ModelConfig.model_validate(data)


def _config_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    path = Path(name_or_path)
    if relative_to is not None and not path.is_absolute() and (relative_to / path).is_file():
        path = relative_to / path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file() and preset.is_file():
        path = preset
    if not path.is_file():
        raise FileNotFoundError(f"model config '{name_or_path}' not found: give a YAML path or one of {presets()}")
    return path


def _config_data(name_or_path: str | Path, chain: tuple[Path, ...], relative_to: Path | None = None) -> dict:
    """A config file's mapping with its ``extends`` chain merged in (each file's sections update its base's
    field by field) and its ``checkpoint`` made absolute (relative to the file that names it)."""
    path = _config_path(name_or_path, relative_to).resolve()
    if path in chain:
        raise ValueError(f"model config {path} extends itself ({' -> '.join(p.name for p in (*chain, path))})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:  # one line naming file:line, as a run config's
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ValueError(f"model config {path}{line} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} is not a YAML mapping")
    if data.get("checkpoint") is not None:  # relative to the file, so presets can name shipped weights
        data["checkpoint"] = str((path.parent / data["checkpoint"]).resolve())
    base = data.pop("extends", None)
    if base is None:
        return data
    merged = _config_data(base, (*chain, path), path.parent)
    for key, value in data.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = {**merged[key], **value} if both else value
    return merged


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
