"""Command-line interface (thin: parse, load config, call one function)."""

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
shapes_app = typer.Typer(
    help="The built-in shapes world: prompts, generator pre-training, sample quality.", no_args_is_help=True
)
app.add_typer(shapes_app, name="shapes")
buffer_app = typer.Typer(help="Inspect and verify replay buffers.", no_args_is_help=True)
app.add_typer(buffer_app, name="buffer")
experiment_app = typer.Typer(help="The AR-CoPO analyses: noise sources, objectives.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


def clear_errors(fn: Callable) -> Callable:
    """Turn expected user errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .models.checkpoint import CheckpointError

        try:
            return fn(*args, **kwargs)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            from pydantic import ValidationError

            if isinstance(e, ValidationError) and e.errors():  # the validator's own message, not pydantic's header
                msg = str(e.errors()[0]["msg"]).removeprefix("Value error, ")
            else:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(2) from None

    return wrapper


ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Model config: preset name or YAML path.")]
WhichOpt = Annotated[str, typer.Option(help="Entry of a Self-Forcing style .pt: auto | generator | generator_ema.")]


def require_paths(*given: tuple[Path | None, str]) -> None:
    """One clear error for the first given (path, what) whose path does not exist; None is skipped."""
    for p, what in given:
        if p is not None and not p.exists():
            raise FileNotFoundError(f"{what} {p} does not exist")


def reward_spec(rewards: str, metrics: str) -> tuple[str, str]:
    """--rewards / --metrics with the shapes world's defaults (metrics default only without --rewards)."""
    from .rewards import SHAPES_METRICS, SHAPES_REWARDS

    return rewards or SHAPES_REWARDS, metrics if rewards else (metrics or SHAPES_METRICS)


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


@shapes_app.command("pretrain")
@clear_errors
def shapes_pretrain(
    out: Annotated[Path, typer.Option(help="Output folder (weights, recipe, curve).")] = Path("runs/shapes-pretrain"),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1500,
    batch_size: Annotated[int, typer.Option(help="Videos per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the initialisation and of every data/noise draw.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between sample-quality checks.")] = 250,
    threads: Annotated[int, typer.Option(help="torch CPU threads (results are reproducible per count).")] = 2,
    warmup: Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")] = 100,
    late_onset: Annotated[float, typer.Option(help="Share of videos whose motion starts at chunk 1 or 2.")] = 0.3,
    haze: Annotated[
        float, typer.Option(help="Exposure flicker read from each chunk's initial noise (0 = none; stage 2: 0.5).")
    ] = 0.0,
    init: Annotated[Path | None, typer.Option(help="Start from these weights (fine-tuning).")] = None,
    self_rollout: Annotated[
        float, typer.Option(help="Share of each batch whose first chunk the model samples itself.")
    ] = 0.0,
    config: ConfigOpt = "shapes",
) -> None:
    """Pre-train the shapes generator from scratch (x0-prediction, clean causal context, sampler sigmas).
    The shipped weights came from this command with its defaults (see the recipe next to them)."""
    from .models.shapes.pretrain import PretrainConfig, pretrain

    if init is not None and not init.is_file():
        raise FileNotFoundError(f"--init {init} does not exist: give the weights of a first pre-training run")
    cfg = PretrainConfig(
        model=config,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        eval_every=eval_every,
        threads=threads,
        warmup=warmup,
        late_onset=late_onset,
        haze=haze,
        init=str(init) if init is not None else None,
        self_rollout=self_rollout,
    )
    command = "streamalign " + " ".join(sys.argv[1:])
    report = pretrain(cfg, out, command=command)
    m, o = report["held_in"]["model"], report["held_out"]["model"]
    print(
        f"wrote {out}/shapes.safetensors in {report['wall_time_s'] / 60:.1f} min: held-in colour "
        f"{m['colour_ok']:.0%} direction {m['direction_ok']:.0%}; held-out colour {o['colour_ok']:.0%} "
        f"direction {o['direction_ok']:.0%}"
    )


@shapes_app.command("prompts")
def shapes_prompts(
    held_out: Annotated[bool, typer.Option("--held-out", help="Only the 36 held-out prompts.")] = False,
    held_in: Annotated[bool, typer.Option("--held-in", help="Only the 252 pre-training prompts.")] = False,
) -> None:
    """Print the world's grammar prompts, one per line (all 288 by default)."""
    from .models.shapes import all_prompts, held_in_prompts, held_out_prompts

    prompts = held_out_prompts() if held_out else held_in_prompts() if held_in else all_prompts()
    print("\n".join(p.text for p in prompts))


@shapes_app.command("check")
@clear_errors
def shapes_check(
    weights: Annotated[Path | None, typer.Option(help="Generator weights (default: the shipped ones).")] = None,
    videos: Annotated[int, typer.Option(help="Samples per prompt set (held-in and held-out).")] = 96,
    seed: Annotated[int, typer.Option(help="First seed; sample i uses seed + i.")] = 0,
) -> None:
    """Sample quality of a shapes generator: prompted colour/direction rates and every reward, next to
    rendered ground truth for the same prompts."""
    from .models.shapes import SHIPPED_WEIGHTS, ShapesWorld, held_in_prompts, held_out_prompts
    from .models.shapes.quality import sample_quality

    world = ShapesWorld.from_pretrained(weights or SHIPPED_WEIGHTS)
    for name, prompts in (("held-in", held_in_prompts()), ("held-out", held_out_prompts())):
        chosen = [prompts[(i * 7) % len(prompts)] for i in range(videos)]
        q = sample_quality(world, chosen, [seed + i for i in range(videos)])
        print(f"{name} ({videos} samples)      model   ground truth")
        for k in q["model"]:
            print(f"  {k:24s} {q['model'][k]:6.3f}   {q['ground_truth'][k]:6.3f}")


def prompt_set(prompts: Path | None, config: str, which: str = "held-in") -> tuple[str, ...]:
    """Prompts from a file (one per line), else the shapes world's held-in / held-out set."""
    if prompts is not None:
        if not prompts.is_file():
            raise FileNotFoundError(f"prompt file {prompts} not found")
        texts = tuple(line.strip() for line in prompts.read_text().splitlines() if line.strip())
        if not texts:
            raise ValueError(f"prompt file {prompts} has no prompts")
        return texts
    if config == "shapes":
        from .models.shapes import held_in_prompts, held_out_prompts

        return tuple(p.text for p in (held_in_prompts() if which == "held-in" else held_out_prompts()))
    raise ValueError("give --prompts FILE (one prompt per line)")


@app.command("collect")
@clear_errors
def collect_cmd(
    out: Annotated[Path, typer.Option(help="Buffer folder (shards + manifest/); re-running resumes.")],
    groups: Annotated[int, typer.Option(help="Fork groups to collect.")] = 64,
    group_size: Annotated[int, typer.Option("--group-size", "-G", help="Branches per group.")] = 12,
    sigma: Annotated[float, typer.Option(help="Perturbation strength of the pivot's initial noise.")] = 0.5,
    pivot: Annotated[str, typer.Option(help="'uniform' or a fixed 0-based chunk index.")] = "uniform",
    seed: Annotated[int, typer.Option(help="Seed of every group's noise and pivot.")] = 0,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file, one per line (default: shapes held-in).")] = None,
    format: Annotated[str, typer.Option("--format", help="webdataset | zarr")] = "webdataset",
    entries_per_shard: Annotated[int, typer.Option(help="Groups per shard.")] = 16,
    store_kv: Annotated[bool, typer.Option("--store-kv", help="Also store the prefix KV of each group.")] = False,
    fork: Annotated[
        str, typer.Option(help="initial: branches differ in the pivot's initial noise; solver: in its re-noising.")
    ] = "initial",
    clip_chunks: Annotated[
        int | None, typer.Option(help="Streaming: score only this many chunks from the pivot (long configs).")
    ] = None,
    rewards: Annotated[str, typer.Option(help="Composite: name[:topNN][:gray]=weight,...")] = "",
    metrics: Annotated[str, typer.Option(help="OOD metrics stored alongside (comma-separated).")] = "",
    config: ConfigOpt = "shapes",
    checkpoint: Annotated[Path | None, typer.Option(help="Generator weights (shapes: shipped).")] = None,
    lora: Annotated[Path | None, typer.Option(help="LoRA adapter merged into the policy.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: adapter config).")] = None,
    wan_dir: Annotated[Path | None, typer.Option(help="Local Diffusers Wan2.1 folder (UMT5 + VAE).")] = None,
) -> None:
    """Roll out fork groups from a policy, score every branch and write a sharded replay buffer.
    Under `torchrun --nproc_per_node N` each rank writes a disjoint set of shards."""
    from .buffer.inspect import buffer_info
    from .collect.collector import CollectConfig, collect
    from .collect.distributed import rank_and_world
    from .collect.policy import Policy

    texts = prompt_set(prompts, config)
    rewards, metrics = reward_spec(rewards, metrics)
    cfg = CollectConfig(
        prompts=texts,
        groups=groups,
        group_size=group_size,
        strength=sigma,
        pivot=pivot,
        seed=seed,
        format=format,
        entries_per_shard=entries_per_shard,
        store_kv=store_kv,
        fork=fork,
        clip_chunks=clip_chunks,
        rewards=rewards,
        metrics=metrics,
    )
    policy = Policy.load(config, checkpoint, lora, lora_alpha, wan_dir)
    with rank_and_world() as (rank, world):
        s = collect(policy, cfg, out, rank, world)
    if rank == 0:
        b = buffer_info(out)
        means = ", ".join(f"{k.removeprefix('reward_')} {v:.3f}" for k, v in b["reward_means"].items())
        print(
            f"{out}: {b['groups']} groups ({b['branches']} branches) in {b['shards']} shards, "
            f"{b['bytes'] / 2**20:.1f} MiB, {b['rejected_groups']} rejected; this run wrote {s.shards_written} shards "
            f"({s.groups / max(s.seconds, 1e-9):.2f} groups/s), skipped {s.shards_skipped} finished"
        )
        print(f"reward means: {means}")


@app.command("train")
@clear_errors
def train_cmd(
    out: Annotated[Path, typer.Option(help="Run folder: adapter/, checkpoints/, metrics.jsonl, curves.png.")],
    mode: Annotated[str, typer.Option(help="semi: stream --buffer; on: fresh rollouts + K updates each.")] = "semi",
    buffer: Annotated[Path | None, typer.Option(help="Replay buffer folder (semi).")] = None,
    steps: Annotated[int, typer.Option(help="Updates (semi) or iterations (on).")] = 100,
    batch_groups: Annotated[int, typer.Option(help="Fork groups per update, over all ranks.")] = 8,
    accum: Annotated[int, typer.Option(help="Batches accumulated per update.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip.")] = 1.0,
    warmup: Annotated[int, typer.Option(help="Linear warm-up updates.")] = 0,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 64,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = 128.0,
    init_adapter: Annotated[Path | None, typer.Option(help="Continue training this peft adapter.")] = None,
    anchors: Annotated[int, typer.Option(help="CoPO anchors per group.")] = 4,
    pivot_steps: Annotated[int | None, typer.Option(help="Pivot denoising steps per group (default all).")] = None,
    tau: Annotated[float | None, typer.Option(help="CoPO temperature (default adaptive).")] = None,
    tau_scale: Annotated[float, typer.Option(help="Adaptive tau = scale x median old distance.")] = 1.0,
    objective: Annotated[str, typer.Option(help="copo | nft | sde-grpo.")] = "copo",
    clip_eps: Annotated[float, typer.Option(help="Ratio clip epsilon (copo, sde-grpo).")] = 1e-4,
    no_clip: Annotated[bool, typer.Option("--no-clip", help="Off-policy ablation: no ratio clip.")] = False,
    nft_beta: Annotated[float, typer.Option(help="NFT v+/v- mixing beta.")] = 0.1,
    kl_w: Annotated[float, typer.Option(help="NFT selective-KL weight.")] = 1e-4,
    kappa: Annotated[float, typer.Option(help="NFT initial selective-KL fraction (adapts in [0.02, 0.2]).")] = 0.1,
    kl_target: Annotated[float, typer.Option(help="NFT: kappa grows while the KL is above this.")] = 1e-3,
    ref_reset_kl: Annotated[float, typer.Option(help="NFT: reset the reference when the KL exceeds this.")] = 1.0,
    old_decay_rate: Annotated[float, typer.Option(help="NFT old policy: d = min(rate x step, max).")] = 1e-3,
    old_decay_max: Annotated[float, typer.Option(help="NFT old policy: the cap of d.")] = 0.5,
    primary_reward: Annotated[str | None, typer.Option(help="NFT: primary reward (default: largest weight).")] = None,
    context: Annotated[str, typer.Option(help="Prefix KV: recompute | stored.")] = "recompute",
    filter: Annotated[str | None, typer.Option(help="SQL over `manifest` returning entry_id (semi).")] = None,
    reward_weights: Annotated[str | None, typer.Option(help="Re-weight rewards at read time: a=1,b=0.5.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt file (on; default: shapes held-in).")] = None,
    group_size: Annotated[int, typer.Option("--group-size", "-G", help="Branches per fresh group (on).")] = 12,
    sigma: Annotated[float, typer.Option(help="Pivot noise perturbation strength (on).")] = 0.5,
    updates_per_iter: Annotated[int, typer.Option(help="Updates per fresh batch (on).")] = 2,
    clip_chunks: Annotated[int | None, typer.Option(help="Streaming (on): score the clip from the pivot.")] = None,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N updates (semi) / iterations (on).")] = 50,
    eval_every: Annotated[int, typer.Option(help="Score fresh videos every N updates (0: never).")] = 0,
    eval_prompts: Annotated[int, typer.Option(help="Training prompts scored at each evaluation.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the LoRA init, data order and anchors.")] = 0,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in --out.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases.")] = False,
    device: Annotated[str, typer.Option(help="auto (cuda:LOCAL_RANK if available) | cpu | cuda[:N].")] = "auto",
    autocast: Annotated[str, typer.Option(help="auto (bf16 on CUDA) | bf16 | off.")] = "auto",
    config: ConfigOpt = "shapes",
    checkpoint: Annotated[Path | None, typer.Option(help="Base generator weights (shapes: shipped).")] = None,
    wan_dir: Annotated[Path | None, typer.Option(help="Local Diffusers Wan2.1 folder (UMT5 + VAE).")] = None,
) -> None:
    """Train a LoRA on the pivot chunk (CoPO, NFT or SDE-GRPO): semi-on-policy from a buffer, or on-policy.
    Under `torchrun --nproc_per_node N` gradients are averaged over ranks."""
    from .train.config import TrainConfig
    from .train.loop import train

    texts = prompt_set(prompts, config) if mode == "on" or eval_every else ()
    cfg = TrainConfig(
        mode=mode, model=config, checkpoint=str(checkpoint) if checkpoint else None,
        wan_dir=str(wan_dir) if wan_dir else None, init_adapter=str(init_adapter) if init_adapter else None,
        lora_rank=lora_rank, lora_alpha=lora_alpha, steps=steps, batch_groups=batch_groups, accum=accum, lr=lr,
        weight_decay=weight_decay, grad_clip=grad_clip, warmup=warmup, seed=seed, anchors=anchors,
        pivot_steps=pivot_steps, tau=tau, tau_scale=tau_scale, clip_eps=clip_eps, clip=not no_clip, context=context,
        objective=objective, nft_beta=nft_beta, kl_w=kl_w, kappa=kappa, kl_target=kl_target,
        ref_reset_kl=ref_reset_kl, old_decay_rate=old_decay_rate, old_decay_max=old_decay_max,
        primary_reward=primary_reward,
        buffer=str(buffer) if buffer else None, filter=filter, reward_weights=parse_weights(reward_weights),
        prompts=texts if mode == "on" else (), group_size=group_size, strength=sigma,
        updates_per_iter=updates_per_iter, clip_chunks=clip_chunks, save_every=save_every, eval_every=eval_every,
        eval_prompts=texts[:: max(1, len(texts) // eval_prompts)][:eval_prompts] if eval_every else (),
        threads=threads, wandb=wandb, device=device, autocast=autocast,
    )  # fmt: skip
    require_paths((buffer, "buffer"), (init_adapter, "adapter"), (checkpoint, "checkpoint"))
    s = train(cfg, out, resume=resume)
    f = s.final
    ev = f" eval composite {f['eval_composite']:.4f};" if "eval_composite" in f else ""
    print(
        f"{out}: {s.steps} updates in {s.seconds:.1f} s; last loss {f.get('loss', float('nan')):.4g};{ev} "
        f"adapter {s.adapter}"
    )


PromptsOpt = Annotated[Path | None, typer.Option(help="Prompt file (default: the shapes --prompt-set).")]
PromptSetOpt = Annotated[str, typer.Option("--prompt-set", help="Shapes set when no file: held-in | held-out.")]
SeedsOpt = Annotated[int, typer.Option(help="Seeds per prompt (pair i uses --seed + i for every model).")]
SeedOpt = Annotated[int, typer.Option(help="First seed of the (prompt, seed) pairs.")]
RewardsOpt = Annotated[str, typer.Option(help="Composite: name[:topNN][:gray]=weight,... (default: shapes).")]
MetricsOpt = Annotated[str, typer.Option(help="OOD metrics, comma-separated (default: shapes).")]
BaseOpt = Annotated[Path | None, typer.Option("--checkpoint", help="Base generator weights (shapes: shipped).")]
WanDirOpt = Annotated[Path | None, typer.Option(help="Local Diffusers Wan2.1 folder (UMT5 + VAE).")]


def _eval_settings(config, checkpoint, wan_dir, rewards, metrics, seeds, seed, samples=4):
    from .evaluate.report import EvalSettings

    rewards, metrics = reward_spec(rewards, metrics)
    return EvalSettings(
        config=config, checkpoint=str(checkpoint) if checkpoint else None, wan_dir=str(wan_dir) if wan_dir else None,
        rewards=rewards, metrics=metrics, seeds_per_prompt=seeds, seed=seed, samples=samples,
    )  # fmt: skip


@app.command("evaluate")
@clear_errors
def evaluate_cmd(
    out: Annotated[Path, typer.Option(help="Report folder: report.md, report.json, diffs.png, samples/.")],
    lora: Annotated[list[Path] | None, typer.Option(help="Adapter to compare with the base (repeatable).")] = None,
    weights: Annotated[list[Path] | None, typer.Option(help="Full merged weights to compare (repeatable).")] = None,
    prompts: PromptsOpt = None,
    which_set: PromptSetOpt = "held-out",
    seeds: SeedsOpt = 4,
    seed: SeedOpt = 2_000_000,
    samples: Annotated[int, typer.Option(help="(prompt, seed) pairs written as GIFs and frame grids.")] = 4,
    rewards: RewardsOpt = "",
    metrics: MetricsOpt = "",
    config: ConfigOpt = "shapes",
    checkpoint: BaseOpt = None,
    wan_dir: WanDirOpt = None,
) -> None:
    """Score the base model and every adapter / merged model on the same prompts and noise; write a
    report with paired differences vs base (95% bootstrap intervals), per-prompt values, plots, samples."""
    from .evaluate.report import ModelSpec, evaluate

    if which_set not in ("held-in", "held-out"):
        raise ValueError(f"--prompt-set must be held-in or held-out, got {which_set!r}")
    require_paths(*((p, "adapter") for p in lora or []), *((p, "weights") for p in weights or []),
                  (checkpoint, "checkpoint"))  # fmt: skip
    models = [ModelSpec("base")]
    models += [ModelSpec(f"lora-{i}-{p.name}" if p.name == "adapter" else p.name, lora=str(p))
               for i, p in enumerate(lora or [])]  # fmt: skip
    models += [ModelSpec(p.stem, checkpoint=str(p)) for p in weights or []]
    st = _eval_settings(config, checkpoint, wan_dir, rewards, metrics, seeds, seed, samples)
    report = evaluate(models, prompt_set(prompts, config, which_set), st, out)
    for name, m in report["models"].items():
        d = m.get("vs_base", {}).get("composite")
        extra = f" ({d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] vs base)" if d else ""
        print(f"{name}: composite {m['means']['composite']:.4f}{extra}")
    print(f"report: {out / 'report.md'}")


@app.command("merge")
@clear_errors
def merge_cmd(
    on: Annotated[Path, typer.Option(help="On-policy LoRA (peft folder); its scale is swept.")],
    out: Annotated[Path, typer.Option(help="Output: sweep.md/json/png, adapters/, adapter/ (selected).")],
    semi: Annotated[Path | None, typer.Option(help="Semi-on-policy LoRA (peft folder), at --s-semi.")] = None,
    s_semi: Annotated[float, typer.Option(help="Scale of the semi-on-policy LoRA.")] = 1.0,
    scales: Annotated[str, typer.Option(help="s_on values to evaluate, comma-separated.")] = "0,0.2,0.4,0.6,0.8,1.0",
    ood_metric: Annotated[str, typer.Option(help="OOD metric of the dual criterion.")] = "background_cleanliness",
    ood_tolerance: Annotated[float, typer.Option(help="Allowed drop of the OOD metric vs base.")] = 0.0,
    full_weights: Annotated[bool, typer.Option("--full-weights", help="Also write merged.safetensors.")] = False,
    prompts: PromptsOpt = None,
    which_set: PromptSetOpt = "held-in",
    seeds: SeedsOpt = 4,
    seed: SeedOpt = 2_000_000,
    rewards: RewardsOpt = "",
    metrics: MetricsOpt = "",
    config: ConfigOpt = "shapes",
    checkpoint: BaseOpt = None,
    wan_dir: WanDirOpt = None,
) -> None:
    """W0 + s_semi dW_semi + s_on dW_on, exactly, for every s_on in --scales; evaluate each and select the
    largest scale that raises the composite without lowering the OOD metric (else keep the base)."""
    from .evaluate.sweep import merge_sweep

    try:
        values = [float(x) for x in scales.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--scales {scales!r} is not a comma-separated list of numbers") from None
    require_paths((on, "on-policy adapter"), (semi, "semi-on-policy adapter"), (checkpoint, "checkpoint"))
    st = _eval_settings(config, checkpoint, wan_dir, rewards, metrics, seeds, seed)
    r = merge_sweep(on, semi, values, prompt_set(prompts, config, which_set), st, out, s_semi, ood_metric,
                    ood_tolerance, full_weights)  # fmt: skip
    print((out / "sweep.md").read_text())
    print(f"selected adapter: {r['adapter']}" if r["selected_scale"] is not None else "no adapter written")


@app.command("generate")
@clear_errors
def generate_cmd(
    prompt: Annotated[str | None, typer.Argument(help="Prompt or scenes: 'one[5s] | two[10s#] | three'.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for NNNN.mp4 and generate.json.")] = Path("runs/generate"),
    prompts: Annotated[Path | None, typer.Option(help="File with one prompt (or scene line) per line.")] = None,
    lora: Annotated[Path | None, typer.Option(help="Adapter (peft folder) merged into the model.")] = None,
    frames: Annotated[int | None, typer.Option(help="Latent frames per video (beyond training: rolling KV).")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second of the MP4 (and of [Ns] durations).")] = 16.0,
    sink: Annotated[int | None, typer.Option(help="Sink frames of the rolling cache (default: config).")] = None,
    window: Annotated[int | None, typer.Option(help="Rolling window in frames (default: training length).")] = None,
    seed: Annotated[int, typer.Option(help="Video i uses seed + i.")] = 0,
    config: ConfigOpt = "shapes",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Generator weights: base or merged (shapes: shipped).")
    ] = None,
    wan_dir: WanDirOpt = None,
) -> None:
    """Text to video (MP4) with base, adapter or merged weights; long videos with the rolling KV cache;
    multi-scene lines (`|` between scenes, `[Ns]` durations, `[Ns#]` a hard cut into that scene)."""
    from .collect.policy import Policy
    from .generate.run import generate

    if (prompt is None) == (prompts is None):
        raise ValueError("give a PROMPT argument or --prompts FILE (one of them)")
    lines = [prompt] if prompt is not None else list(prompt_set(prompts, config))
    require_paths((lora, "adapter"), (checkpoint, "checkpoint"), (wan_dir, "Wan folder"))
    if frames is not None and frames < 1:
        raise ValueError(f"--frames {frames} must be >= 1")
    policy = Policy.load(config, checkpoint, lora, wan_dir=wan_dir)
    paths = generate(policy, lines, out, seed=seed, fps=fps, frames=frames, sink=sink, window=window)
    print(f"wrote {len(paths)} video(s) to {out}")


@experiment_app.command("noise-sources")
@clear_errors
def experiment_noise_sources(
    out: Annotated[Path, typer.Option(help="Folder: noise_sources.md/json/png.")] = Path("runs/noise-sources"),
    prompts: PromptsOpt = None,
    which_set: PromptSetOpt = "held-in",
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="Prompts used (spread over the set).")] = 4,
    seeds: Annotated[int, typer.Option(help="Fork groups per prompt and pivot.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", "-G", help="Branches per group.")] = 8,
    rewards: RewardsOpt = "",
    metrics: MetricsOpt = "",
    lora: Annotated[Path | None, typer.Option(help="Adapter merged into the model.")] = None,
    config: ConfigOpt = "shapes",
    checkpoint: BaseOpt = None,
    wan_dir: WanDirOpt = None,
) -> None:
    """Output variance when only the pivot's initial noise changes vs only one solver noise (AR-CoPO Fig. 6)."""
    from .collect.policy import Policy
    from .evaluate.experiments import run_noise_sources
    from .evaluate.report import spread
    from .rewards import CompositeReward

    texts = spread(list(prompt_set(prompts, config, which_set)), n_prompts)
    reward = CompositeReward.parse(*reward_spec(rewards, metrics))
    policy = Policy.load(config, checkpoint, lora, wan_dir=wan_dir)
    run_noise_sources(policy, texts, reward, out, seeds, group_size)
    print((out / "noise_sources.md").read_text())


@experiment_app.command("objectives")
@clear_errors
def experiment_objectives(
    out: Annotated[Path, typer.Option(help="Folder: objectives.md/json/png and one run per objective.")] = Path(
        "runs/objectives"
    ),
    runs: Annotated[str, typer.Option(help="Comma-separated: copo, copo-offpolicy, nft, sde-grpo.")] = (
        "copo,copo-offpolicy,nft,sde-grpo"
    ),
    prompts: PromptsOpt = None,
    which_set: PromptSetOpt = "held-in",
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="Training prompts (spread over the set).")] = 8,
    iterations: Annotated[int, typer.Option(help="On-policy iterations per objective (equal budget).")] = 15,
    batch_groups: Annotated[int, typer.Option(help="Fresh groups per iteration.")] = 8,
    group_size: Annotated[int, typer.Option("--group-size", "-G", help="Branches per group.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (all objectives).")] = 1e-4,
    eval_every: Annotated[int, typer.Option(help="Updates between curve points.")] = 6,
    eval_seeds: Annotated[int, typer.Option(help="Fresh seeds per prompt for the curves and the table.")] = 4,
    seed: SeedOpt = 0,
    config: ConfigOpt = "shapes",
    checkpoint: BaseOpt = None,
    wan_dir: WanDirOpt = None,
) -> None:
    """Equal-budget on-policy comparison of the objectives on the same prompts and seeds (AR-CoPO Fig. 2)."""
    from .evaluate.experiments import compare_objectives
    from .evaluate.report import spread
    from .rewards import SHAPES_METRICS, SHAPES_REWARDS, CompositeReward
    from .train.config import TrainConfig

    texts = tuple(spread(list(prompt_set(prompts, config, which_set)), n_prompts))
    base = TrainConfig(
        mode="on", model=config, checkpoint=str(checkpoint) if checkpoint else None,
        wan_dir=str(wan_dir) if wan_dir else None, prompts=texts, steps=iterations, batch_groups=batch_groups,
        group_size=group_size, lr=lr, eval_every=eval_every, seed=seed, save_every=10**6,
    )  # fmt: skip
    names = [x.strip() for x in runs.split(",") if x.strip()]
    reward = CompositeReward.parse(SHAPES_REWARDS, SHAPES_METRICS)
    compare_objectives(base, names, texts, reward, out, eval_seeds)
    print((out / "objectives.md").read_text())


@app.command("demo")
@clear_errors
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Demo folder (buffer, runs, merge sweep, report).")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option("--quick", help="A smaller run for CI (< 2 min).")] = False,
) -> None:
    """Collect -> train semi -> train on -> merge sweep -> evaluate on held-out prompts, on the shapes world."""
    from .evaluate.demo import DemoSettings, run_demo

    h = run_demo(out, DemoSettings.quick() if quick else DemoSettings())
    c, b = h["held_out_composite"], h["held_out_background_cleanliness"]
    print(f"demo finished in {h['seconds']:.0f} s; selection: {h['selection']}")
    print(
        f"held-out prompts, {h['evaluated']} vs base: composite {c['base']:.4f} -> {c['model']:.4f} "
        f"({c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]); background_cleanliness "
        f"{b['base']:.4f} -> {b['model']:.4f} ({b['diff']:+.4f})"
    )
    print(f"report: {h['report']}")


def parse_weights(spec: str | None) -> dict[str, float] | None:
    """'a=1,b=0.5' -> {'a': 1.0, 'b': 0.5}."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        name, sep, w = part.partition("=")
        try:
            out[name.strip()] = float(w)
        except ValueError:
            raise ValueError(f"--reward-weights: {part!r} is not name=number") from None
        if not sep or not name.strip():
            raise ValueError(f"--reward-weights: {part!r} is not name=number")
    return out


@buffer_app.command("info")
@clear_errors
def buffer_info_cmd(folder: Annotated[Path, typer.Argument(help="Buffer folder.")]) -> None:
    """Counts, sizes, schema, formats, policies, pivots and reward means of a buffer."""
    import json

    from .buffer.inspect import buffer_info

    print(json.dumps(buffer_info(folder), indent=1))


@buffer_app.command("verify")
@clear_errors
def buffer_verify_cmd(
    folder: Annotated[Path, typer.Argument(help="Buffer folder.")],
    deep: Annotated[bool, typer.Option("--deep", help="Also decode and validate every entry.")] = False,
) -> None:
    """Check every shard against the manifest's checksums; exit 1 on any damage."""
    from .buffer.inspect import verify_buffer

    report = verify_buffer(folder, deep=deep)
    for p in report.problems:
        print(f"DAMAGED {p}")
    print(f"{report.checked} shards checked, {len(report.problems)} problem(s)")
    if not report.ok:
        raise typer.Exit(1)


@app.command("stats")
@clear_errors
def stats_cmd(
    folder: Annotated[Path, typer.Argument(help="Buffer folder.")],
    sql: Annotated[str | None, typer.Option(help="Read-only SQL over the view `manifest`.")] = None,
    report: Annotated[
        str | None, typer.Option(help="per-prompt | zero-variance | pivots | correlation | by-policy")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="table | csv | json | parquet")] = "table",
    output: Annotated[Path | None, typer.Option(help="Write the result to this file.")] = None,
) -> None:
    """DuckDB SQL over the buffer manifest (one row per branch, reward_<name> columns), or a named report."""
    from .buffer.stats import run_query, write_result

    text = write_result(run_query(folder, sql, report), format, output)
    if text is not None:
        print(text)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
