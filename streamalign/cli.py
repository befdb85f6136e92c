"""Command-line interface (thin: parse, load config, call one function). Commands appear as they land."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="streamalign",
    help="Align streaming (chunk-autoregressive, few-step) text-to-video generators with reward models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Inspect, validate and convert generator checkpoints.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def clear_errors(fn: Callable) -> Callable:
    """Turn expected user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .models.checkpoint import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Model config: preset name or YAML path.")]
WhichOpt = Annotated[str, typer.Option(help="Entry of a Self-Forcing style .pt: auto | generator | generator_ema.")]


@model_app.command("configs")
def model_configs() -> None:
    """List the shipped model config presets."""
    from .schemas.config import ModelConfig, presets

    for name in presets():
        c = ModelConfig.load(name)
        a = c.arch
        print(
            f"{name:10s} dim {a.dim:5d}  layers {a.num_layers:3d}  heads {a.num_heads:3d}  ffn {a.ffn_dim:6d}  "
            f"latent {c.latent.frames}x{c.latent.channels}x{c.latent.height}x{c.latent.width}  "
            f"{c.tokens_per_frame} tokens/frame"
        )


@model_app.command("info")
@clear_errors
def model_info(
    config: ConfigOpt = "wan-1.3b",
    checkpoint: Annotated[Path | None, typer.Option(help="Local checkpoint to load strictly.")] = None,
    which: WhichOpt = "auto",
    lora: Annotated[Path | None, typer.Option(help="LoRA file/folder to merge (LongLive or peft).")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: adapter config, else rank).")] = None,
) -> None:
    """Build the generator from a config (and checkpoint), report its size and geometry."""
    from .models.checkpoint import load_generator
    from .schemas.config import ModelConfig

    cfg = ModelConfig.load(config)
    if lora is not None and checkpoint is None:
        raise ValueError("--lora needs --checkpoint (the base weights the LoRA is merged into)")
    if checkpoint is None:
        import torch

        with torch.device("meta"):
            from .models.wan import CausalWanModel

            model = CausalWanModel(cfg.arch)
    else:
        model = load_generator(cfg, checkpoint, which=which, lora=lora, lora_alpha=lora_alpha)
    n = sum(p.numel() for p in model.parameters())
    print(f"config      {cfg.name} (arch id {cfg.arch_id})")
    print(f"parameters  {n / 1e6:.1f} M")
    print(
        f"latent      {cfg.latent.frames} frames x {cfg.latent.channels} x {cfg.latent.height} x {cfg.latent.width}, "
        f"{cfg.tokens_per_frame} tokens/frame, {cfg.num_chunks} chunks of {cfg.sampler.chunk_frames}"
    )
    from .models.sampler import Schedule

    s = Schedule.from_config(cfg.sampler)
    print("timesteps   " + ", ".join(f"{t:.1f}" for t in s.timesteps))
    print("sigmas      " + ", ".join(f"{x:.4f}" for x in s.sigmas))
    print(
        f"cache       {'global' if cfg.cache.window is None else f'sink {cfg.cache.sink} + window {cfg.cache.window}'}"
    )
    if checkpoint is not None:
        print(f"checkpoint  {checkpoint}: all {len(model.state_dict())} tensors loaded strictly")


@model_app.command("convert")
@clear_errors
def model_convert(
    checkpoint: Annotated[Path, typer.Argument(help="Source checkpoint (.pt or .safetensors).")],
    output: Annotated[Path, typer.Argument(help="Destination .safetensors file.")],
    config: ConfigOpt = "wan-1.3b",
    which: WhichOpt = "auto",
    lora: Annotated[Path | None, typer.Option(help="LoRA to merge before saving.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: adapter config, else rank).")] = None,
) -> None:
    """Validate a checkpoint strictly and save it as a bare-key .safetensors file (atomic write)."""
    from .models.checkpoint import load_generator, save_safetensors

    model = load_generator(config, checkpoint, which=which, lora=lora, lora_alpha=lora_alpha, dtype=None)
    save_safetensors(model.state_dict(), output)
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
