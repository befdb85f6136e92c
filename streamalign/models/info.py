"""`streamalign model info`: a config's size, geometry, schedule and cache policy (and a strict load check)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io.outputs import check_output_file, output_file
from ..schemas.config import ModelConfig, presets
from ..schemas.run import RunConfig, arg
from .checkpoint import load_generator, read_lora, save_safetensors, shipped_lora
from .sampler import Schedule
from .wan import CausalWanModel


def model_summary(config: str, checkpoint: str | Path | None = None, which: str = "auto",
                  lora: str | Path | None = None, lora_alpha: float | None = None,
                  base_lora: str | Path | None = None, base_lora_alpha: float | None = None) -> str:  # fmt: skip
    """Lines describing the model of `config`; with a checkpoint, loaded strictly (the shipped LoRA and an
    adapter merged), saying which entry was read and which LoRAs were merged with which alpha."""
    cfg = ModelConfig.load(config)
    if (lora is not None or base_lora is not None) and checkpoint is None:
        flag = "--lora" if lora is not None else "--base-lora"
        raise ValueError(f"{flag} needs --checkpoint (the base weights the LoRA is merged into)")
    if checkpoint is None:
        with torch.device("meta"):
            model = CausalWanModel(cfg.arch)
    else:
        model = load_generator(cfg, checkpoint, which=which, lora=lora, lora_alpha=lora_alpha,
                               base_lora=shipped_lora(cfg, base_lora), base_lora_alpha=base_lora_alpha)  # fmt: skip
    s, lat = Schedule.from_config(cfg.sampler), cfg.latent
    lines = [
        f"config      {cfg.name} (arch id {cfg.arch_id})",
        f"parameters  {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M",
        f"latent      {lat.frames} frames x {lat.channels} x {lat.height} x {lat.width}, {cfg.tokens_per_frame} "
        f"tokens/frame, {cfg.num_chunks} chunks of {cfg.sampler.chunk_frames}",
        "timesteps   " + ", ".join(f"{t:.1f}" for t in s.timesteps),
        "sigmas      " + ", ".join(f"{x:.4f}" for x in s.sigmas),
        f"cache       {cache_words(cfg)}",
        f"components  text {cfg.text.kind}, codec {cfg.codec.kind}" + (f", world {cfg.world}" if cfg.world else ""),
    ]
    w = cfg.weights
    if w.repo is not None:
        lines.append(f"published   {w.repo}: {w.file} (entry {w.entry}, keys {w.key_prefix or 'bare'})"
                     + (f"; LoRA {cfg.lora.file} (rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g})" if cfg.lora else ""))
    if checkpoint is not None:
        report = model.load_report
        lines.append(f"checkpoint  {checkpoint}: all {len(model.state_dict())} tensors loaded strictly")
        lines.append(f"entry       {ENTRY_WORDS.get(report.entry, report.entry)}")
        for path, alpha, layers in report.loras:
            rank = next(iter(_ranks(path)), None)
            a = alpha if alpha is not None else rank
            lines.append(f"lora        {path} merged into {layers} layers: rank {rank}, alpha {a:g} "
                         f"(scale {a / rank:g})")  # fmt: skip
        if not report.loras:
            lines.append("lora        none merged")
    return "\n".join(lines)


ENTRY_WORDS = {None: "the file's tensors (no entries)", "generator_ema": "generator_ema (the EMA weights)",
               "generator": "generator (not the EMA weights)"}  # fmt: skip


def _ranks(path: str) -> set[int]:
    return {a.shape[0] for k, a in read_lora(path)[0].items() if ".lora_A" in k}


def cache_words(cfg: ModelConfig) -> str:
    if cfg.cache.window is None:
        return "global"
    recompute = ", context recomputed" if cfg.cache.recompute_context else ""
    return f"sink {cfg.cache.sink} + window {cfg.cache.window}{recompute}"


def preset_lines(names: list[str]) -> str:
    """One line per preset config: size and geometry."""
    out = []
    for name in names:
        c = ModelConfig.load(name)
        a = c.arch
        w = c.weights
        files = f"  {w.repo}:{w.file}" + (f" + LoRA r{c.lora.rank}" if c.lora else "") if w.repo else ""
        out.append(f"{name:17s} dim {a.dim:5d}  layers {a.num_layers:3d}  heads {a.num_heads:3d}  ffn {a.ffn_dim:6d}  "
                   f"latent {c.latent.frames}x{c.latent.channels}x{c.latent.height}x{c.latent.width}  "
                   f"{c.tokens_per_frame} tokens/frame  cache {cache_words(c)}{files}")  # fmt: skip
    return "\n".join(out)


class ModelInfoRun(RunConfig):
    """Build the generator from a config (and checkpoint), report its size and geometry."""

    config: str = arg("wan-1.3b", "Model config: preset name or YAML path.", short="-c")
    checkpoint: str | None = arg(None, "Local checkpoint to load strictly.")
    which: str = arg("auto", "Entry of a Self-Forcing style .pt: auto | generator | generator_ema.")
    base_lora: str | None = arg(None, "The LoRA the model ships (LongLive's lora.pt), merged first ('none': "
                                "weights it is merged into).")  # fmt: skip
    base_lora_alpha: float | None = arg(None, "Alpha of --base-lora (default: the config's, else the file's, else "
                                        "its rank).")  # fmt: skip
    lora: str | None = arg(None, "LoRA file/folder to merge (LongLive or peft).")
    lora_alpha: float | None = arg(None, "LoRA alpha (default: adapter config, else rank).")


class ConvertRun(ModelInfoRun):
    """Validate a checkpoint strictly and save it as a bare-key .safetensors file (atomic write)."""

    checkpoint: str = arg(..., "Source checkpoint (.pt or .safetensors).", argument=True)
    output: str = arg(..., "Destination .safetensors file.", argument=True)
    overwrite: bool = arg(False, "Replace OUTPUT when a streamalign command wrote it (a file no streamalign "
                          "command wrote is never replaced).")  # fmt: skip


def info_stage(cfg: ModelInfoRun) -> str:
    return model_summary(cfg.config, cfg.checkpoint, cfg.which, cfg.lora, cfg.lora_alpha, cfg.base_lora,
                         cfg.base_lora_alpha)  # fmt: skip


def convert_stage(cfg: ConvertRun) -> str:
    check_output_file(cfg.output, "OUTPUT", cfg.overwrite)  # before the model loads
    base_lora = shipped_lora(ModelConfig.load(cfg.config), cfg.base_lora)
    model = load_generator(cfg.config, cfg.checkpoint, cfg.which, cfg.lora, cfg.lora_alpha, dtype=None,
                           base_lora=base_lora, base_lora_alpha=cfg.base_lora_alpha)  # fmt: skip
    with output_file(cfg.output, "OUTPUT", "model convert", cfg.overwrite) as tmp:
        save_safetensors(model.state_dict(), tmp)
    return f"wrote {cfg.output} ({Path(cfg.output).stat().st_size / 1e6:.1f} MB)"


def configs_stage(cfg: RunConfig) -> str:
    return preset_lines(presets())
