"""One command for a GPU owner: the wan-1.3b generator at full size (480x832, 81 frames = 21 latent frames of
1560 tokens) with random weights on one GPU, a few minutes on an H100/H200, JSON out. Nothing in CI needs it.

Checks (``CHECKS``: name -> function of a :class:`Check` context returning a JSON-able dict):

- ``drift``: bf16 vs fp32 rollout of the same weights, text and noise: relative L2 and max |diff| of the
  latents per chunk (few-step samplers feed each chunk's output to the next: drift accumulates).
- ``attention``: flash-attn vs PyTorch SDPA, one attention call and one bf16 rollout (skipped when
  flash-attn is not installed).
- ``speed``: seconds per chunk and frames/s of an 81-frame bf16 rollout (after a warm-up), its FLOPs
  (``FlopCounterMode``), achieved TFLOP/s and MFU, and the frames/s the arithmetic allows at 60% of the
  GPU's bf16 peak (Self-Forcing reports ~17 FPS on one H100; the limit is ~48 FPS).
- ``compile``: the ``speed`` rollout eager and with ``--compile`` (torch.compile of the transformer blocks,
  graphs reused across chunks) one after the other: frames/s with and without, their ratio, the compile time
  apart, the graphs compiled and the compiled latents' difference from eager's.
- ``memory``: one fork group (G=12 at --pivot) with the branch batch the planner picks for this GPU:
  ``torch.cuda.max_memory_allocated`` vs the plan's prediction (``streamalign.plan``, fake tensors), ratio.
- ``train``: one training update (CoPO with the defaults of ``train`` as on CUDA: LoRA r64 + AdamW, bf16
  autocast, activation checkpointing, the replay batch the plan picks for this GPU) of one G=12 group at
  --pivot: seconds per update, TFLOP/s and MFU (the plan's FLOPs), peak memory vs the plan's train
  estimate (``streamalign.train.memory.train_update_memory``), ratio.

    python bench/gpu_check.py --out gpu_check.json          # on the GPU machine
    python bench/gpu_check.py --dry-run                      # the same path on the CPU at tiny width, seconds

``--dry-run`` runs every check on the CPU with a 4-layer, 64-wide model on 8x8 latents; memory is then the
live-storage tracker's count of real tensors (:class:`streamalign.models.memory.LiveBytes`) instead of the
CUDA allocator's.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from streamalign.models import attention
from streamalign.models.memory import GiB, LiveBytes, measure
from streamalign.models.sampler import Sampler
from streamalign.models.wan import CausalWanModel
from streamalign.plan import GPUS, PlanContext, PlanRun, fork_group_phase
from streamalign.schemas.config import ModelConfig

DRY = dict(arch=dict(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_len=16, text_dim=32, freq_dim=32),
           latent=dict(height=8, width=8, frames=12))  # fmt: skip
ARITHMETIC_MFU = 0.6  # the utilisation the "arithmetic limit" frames/s assume


@dataclass
class Check:
    """What every check gets: the config, device, a random-weight fp32 generator (seeded), a text context."""

    cfg: ModelConfig
    device: torch.device
    dry_run: bool
    group_size: int
    pivot: int
    seed: int = 0
    _models: dict = field(default_factory=dict)

    def model(self, dtype: torch.dtype) -> CausalWanModel:
        """The random generator in `dtype` (the bf16 one a copy of the fp32 one: same weights)."""
        if dtype not in self._models:
            if torch.float32 not in self._models:
                torch.manual_seed(self.seed)
                with torch.device(self.device):
                    m = CausalWanModel(self.cfg.arch).eval().requires_grad_(False)
                with torch.no_grad():  # the Wan init zeroes the head: every output would be equal
                    torch.nn.init.normal_(m.head.head.weight, std=0.02)
                self._models[torch.float32] = m
            self._models[dtype] = copy.deepcopy(self._models[torch.float32]).to(dtype)
        return self._models[dtype]

    def drop(self, dtype: torch.dtype) -> None:
        self._models.pop(dtype, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def text(self) -> torch.Tensor:
        a = self.cfg.arch
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(1, a.text_len, a.text_dim, generator=g).to(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def gpu(self):
        """The GPU type of ``streamalign.plan.GPUS`` this device is, or None."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device).lower()
        key = next((k for k in ("h200", "h100", "a100") if k in name), None)
        if key == "a100" and torch.cuda.get_device_properties(self.device).total_memory < 60 * GiB:
            key = "a100-40"
        return GPUS.get(key) if key else None


def rollout_chunks(sampler: Sampler, text: torch.Tensor, check: Check) -> tuple[torch.Tensor, list[float]]:
    """A batch-1 rollout chunk by chunk: (latents [1, F, C, H, W] float32, seconds per chunk)."""
    cache, bank = sampler.new_cache(1), sampler.noise_bank(check.seed)
    out, times = [], []
    with torch.no_grad():
        for j in range(check.cfg.num_chunks):
            check.sync()
            t0 = time.perf_counter()
            out.append(sampler.denoise_chunk(cache, j, bank, text).x0)
            check.sync()
            times.append(time.perf_counter() - t0)
    return torch.cat(out, dim=1).float(), times


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().cpu(), b.double().cpu()
    return {"rel_l2": float((a - b).norm() / b.norm().clamp(min=1e-30)), "max_abs": float((a - b).abs().max())}


def check_drift(check: Check) -> dict:
    text = check.text()
    ref, _ = rollout_chunks(Sampler(check.model(torch.float32), check.cfg), text, check)
    low, _ = rollout_chunks(Sampler(check.model(torch.bfloat16), check.cfg), text, check)
    check.drop(torch.float32)  # the remaining checks run in bf16
    c = check.cfg.sampler.chunk_frames
    per_chunk = [difference(low[:, j * c : (j + 1) * c], ref[:, j * c : (j + 1) * c])["rel_l2"]
                 for j in range(check.cfg.num_chunks)]  # fmt: skip
    return {**difference(low, ref), "rel_l2_per_chunk": per_chunk}


def check_attention(check: Check) -> dict:
    flash = attention._flash_attn_func
    if flash is None or check.device.type != "cuda":
        return {"skipped": "flash-attn is not installed" if flash is None else "flash-attn needs CUDA"}
    a = check.cfg.arch
    g = torch.Generator(device=check.device).manual_seed(check.seed)
    q, k, v = (torch.randn(1, 2 * check.cfg.tokens_per_frame, a.num_heads, a.head_dim, generator=g,
                           device=check.device, dtype=torch.bfloat16) for _ in range(3))  # fmt: skip
    text = check.text()
    sampler = Sampler(check.model(torch.bfloat16), check.cfg)
    with torch.no_grad():
        kernel_flash = attention.attend(q, k, v)
        video_flash, _ = rollout_chunks(sampler, text, check)
        attention._flash_attn_func = None
        try:
            kernel_sdpa = attention.attend(q, k, v)
            video_sdpa, _ = rollout_chunks(sampler, text, check)
        finally:
            attention._flash_attn_func = flash
    return {"kernel": difference(kernel_flash, kernel_sdpa), "rollout": difference(video_flash, video_sdpa)}


def check_speed(check: Check) -> dict:
    sampler = Sampler(check.model(torch.bfloat16), check.cfg)
    text = check.text()
    rollout_chunks(sampler, text, check)  # warm-up (kernels, allocator)
    _, times = rollout_chunks(sampler, text, check)
    flash, attention._flash_attn_func = attention._flash_attn_func, None  # FLOPs counted on SDPA (known kernels)
    try:
        flops = measure(lambda: rollout_chunks(sampler, text, check), flops=True)[1].flops
    finally:
        attention._flash_attn_func = flash
    c = check.cfg.sampler.chunk_frames
    frames = 4 * (check.cfg.latent.frames - 1) + 1  # the Wan VAE's 4x temporal factor
    total = sum(times)
    out = {"seconds_per_chunk": times, "seconds_mean_after_first": statistics.mean(times[1:] or times),
           "seconds": total, "pixel_frames": frames, "latent_frames": check.cfg.num_chunks * c,
           "frames_per_second": frames / total, "flops": flops, "tflops_per_second": flops / total / 1e12}  # fmt: skip
    gpu = check.gpu
    if gpu is not None:
        out["gpu_type"] = gpu.name
        out["mfu"] = flops / total / (gpu.bf16_tflops * 1e12)
        out["arithmetic_limit_fps"] = frames / (flops / (ARITHMETIC_MFU * gpu.bf16_tflops * 1e12))
    return out


def check_memory(check: Check) -> dict:
    model = check.model(torch.bfloat16)
    for dtype in [d for d in check._models if d != torch.bfloat16]:
        check.drop(dtype)
    total = torch.cuda.get_device_properties(check.device).total_memory if check.device.type == "cuda" else 80 * GiB
    run = PlanRun.build(config="wan-1.3b", dtype="bf16", group_size=check.group_size, pivot=check.pivot,
                        gpu_memory=total / GiB, stages=("collect",))  # fmt: skip
    # the plan of exactly what runs here: this generator alone (no text encoder, no VAE) and this text
    ctx = PlanContext(run, model_config=check.cfg, text_arch=None, vae_arch=None, flops=False)
    phase, bb = fork_group_phase(ctx, check.pivot)
    sampler, text = Sampler(model, check.cfg), check.text()

    def group():
        with torch.no_grad():
            return sampler.fork_group(text, sampler.noise_bank(check.seed), check.pivot, check.group_size,
                                      branch_batch=bb)  # fmt: skip

    if check.device.type == "cuda":
        seconds, measured, reserved, how = cuda_peak(check, group)
    else:
        tracker = LiveBytes(device="cpu")
        tracker.track([*model.parameters(), *model.buffers(), text])
        t0 = time.perf_counter()
        with tracker:
            group()
        seconds = time.perf_counter() - t0
        measured, reserved, how = tracker.peak, None, "LiveBytes (dry run: real CPU tensors)"
    return {"group_size": check.group_size, "pivot": check.pivot, "branch_batch": bb, "measured": measured,
            "reserved": reserved, "predicted": phase.peak, "ratio": measured / phase.peak, "measured_by": how,
            "seconds": seconds}  # fmt: skip


def cuda_peak(check: Check, fn: Callable[[], object]) -> tuple[float, int, int, str]:
    """Seconds of ``fn()`` on the check's CUDA device (synchronised) and its peak bytes allocated and
    reserved, counted from a reset after emptying the allocator's cache."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(check.device)
    check.sync()
    t0 = time.perf_counter()
    fn()
    check.sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(check.device), torch.cuda.max_memory_reserved(check.device)
    return seconds, *peak, "torch.cuda.max_memory_allocated"


def check_train(check: Check) -> dict:
    """One training update (CoPO, defaults of ``train`` as on CUDA: LoRA r64, bf16 autocast, activation
    checkpointing) of one G-branch group at --pivot on the random bf16 generator: seconds per update (after
    a warm-up update) and peak memory vs the plan's (``train_update_memory``, fake tensors; the replay
    batch it picks for this GPU is the one run here). Both are the steady state: the measured update is the
    second, which holds the optimizer's moments the warm-up made (``optimizer_bytes``)."""
    from streamalign.pipeline import Pipeline
    from streamalign.plan import CUDA_RESERVE
    from streamalign.train.config import TrainConfig
    from streamalign.train.loop import Trainer
    from streamalign.train.memory import SIMULATED, FixedText, simulated_entry, train_update_memory, update_memory

    for dtype in [d for d in check._models if d != torch.bfloat16]:
        check.drop(dtype)
    total = torch.cuda.get_device_properties(check.device).total_memory if check.device.type == "cuda" else 80 * GiB
    settings = TrainConfig(buffer=SIMULATED, autocast="bf16", checkpointing="on")  # as on CUDA, also dry
    plan = train_update_memory(check.cfg, settings, pivot=check.pivot, group_size=check.group_size,
                               device=check.device.type, dtype=torch.bfloat16, device_memory=total - CUDA_RESERVE,
                               flops=True)  # fmt: skip
    rb = plan.notes["replay_batch"]
    text = check.text()
    model = check.model(torch.bfloat16)
    check._models.pop(torch.bfloat16)  # the LoRA goes into this model: later checks build a fresh one
    trainer = Trainer(settings.replace(device=str(check.device), replay_batch=rb),
                      pipeline=Pipeline(check.cfg, model, FixedText(text), None, "gpu-check"))  # fmt: skip
    entry = simulated_entry(check.cfg, check.pivot, check.group_size, trainer.objective.fork)
    trainer.update(0, [entry], 1)  # warm-up: kernels, allocator, the optimizer's state
    if check.device.type == "cuda":
        seconds, measured, reserved, how = cuda_peak(check, functools.partial(trainer.update, 1, [entry], 1))
    else:
        t0 = time.perf_counter()
        # the tracker counts what the trainer holds from the warm-up on (AdamW's moments too), as the allocator does
        measured = update_memory(trainer, entry, text, tracker=LiveBytes(device="cpu"), step=1).peak
        seconds, reserved, how = time.perf_counter() - t0, None, "LiveBytes (dry run: real CPU tensors)"
    del trainer, model
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
    out = {"objective": plan.notes["objective"], "group_size": check.group_size, "pivot": check.pivot,
           "replay_batch": rb, "lora_rank": plan.notes["lora_rank"], "optimizer_bytes": plan.notes["optimizer_bytes"],
           "workspace_bytes": plan.notes["workspace_bytes"], "seconds_per_update": seconds,
           "measured": measured, "reserved": reserved, "predicted": plan.peak, "ratio": measured / plan.peak,
           "measured_by": how, "flops": plan.flops, "tflops_per_second": plan.flops / seconds / 1e12}  # fmt: skip
    gpu = check.gpu
    if gpu is not None:
        out["mfu"] = plan.flops / seconds / (gpu.bf16_tflops * 1e12)
    return out


def check_compile(check: Check) -> dict:
    """The bf16 rollout of ``speed`` eager and with ``--compile`` (the transformer blocks' regions compiled,
    :mod:`streamalign.models.compiled`; a copy of the same weights), on the same device one after the other:
    frames/s of each after a warm-up, their ratio, the compile time (the first compiled rollout less a
    steady one), the graphs it compiled and the compiled latents' difference from eager's."""
    from streamalign.models.compiled import compile_blocks

    text = check.text()
    eager = Sampler(check.model(torch.bfloat16), check.cfg)
    model = copy.deepcopy(eager.model)
    stats = compile_blocks(model)
    before = dict(stats.graphs)  # the process's graphs so far (models compiled before share the count)
    compiled = Sampler(model, check.cfg)
    frames = 4 * (check.cfg.latent.frames - 1) + 1  # the Wan VAE's 4x temporal factor
    check.sync()
    t0 = time.perf_counter()
    rollout_chunks(compiled, text, check)  # compiles its graphs
    first = time.perf_counter() - t0
    rollout_chunks(eager, text, check)  # warm-up
    out_e, times_e = rollout_chunks(eager, text, check)
    out_c, times_c = rollout_chunks(compiled, text, check)
    del model, compiled
    return {"eager_frames_per_second": frames / sum(times_e), "compiled_frames_per_second": frames / sum(times_c),
            "speedup": sum(times_e) / sum(times_c), "eager_seconds_per_chunk": times_e,
            "compiled_seconds_per_chunk": times_c, "first_compiled_seconds": first,
            "compile_seconds": first - sum(times_c), "graphs": {r: n - before[r] for r, n in stats.graphs.items()},
            "vs_eager": difference(out_c, out_e)}  # fmt: skip


CHECKS: dict[str, Callable[[Check], dict]] = {
    "drift": check_drift,
    "attention": check_attention,
    "speed": check_speed,
    "compile": check_compile,
    "memory": check_memory,
    "train": check_train,
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny width, seconds (the same code path)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    ap.add_argument("--group-size", type=int, default=None, help="group of the memory and train checks (default 12)")
    ap.add_argument("--pivot", type=int, default=0, help="pivot of the memory and train checks' group")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}")
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run on the GPU machine, or give --dry-run for the CPU path")
    cfg = ModelConfig.load("wan-1.3b")
    if args.dry_run:
        cfg = cfg.with_overrides(arch={**cfg.arch.model_dump(), **DRY["arch"]}, latent=DRY["latent"])
    check = Check(cfg, device, args.dry_run, args.group_size or (4 if args.dry_run else 12), args.pivot)
    report = {"config": cfg.name if not args.dry_run else "wan-1.3b (dry run: tiny width)",
              "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "flash_attn": attention._flash_attn_func is not None,
              "checks": {}}  # fmt: skip
    t_all = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        report["checks"][name] = {**CHECKS[name](check), "check_seconds": time.perf_counter() - t0}
        print(f"{name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report["seconds"] = time.perf_counter() - t_all
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return report


if __name__ == "__main__":
    main()
