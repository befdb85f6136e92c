"""`streamalign generate`: one MP4 per prompt line (each line may hold several scenes), seeds seed + i."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import Field

from ..io.media import save_mp4
from ..io.outputs import output_folder
from ..models.kv_cache import KVCache
from ..models.placement import Placement
from ..pipeline import Pipeline, resolve_config
from ..plan import check_stage
from ..schemas.config import ModelConfig
from ..schemas.run import RunConfig, Section, arg, run_record
from ..schemas.sections import Hardware, PolicySection
from .scenes import chunk_seconds, parse_scenes, scene_chunks


class GenerateSettings(Section):
    """Generation"""

    prompts: tuple[str, ...] | None = arg(None, "File with one prompt (or scene line) per line.", lines=True)
    frames: int | None = Field(None, ge=1, description="Latent frames per video (beyond training: rolling KV).")
    fps: float = arg(16.0, "Frames per second of the MP4 (and of [Ns] durations).")
    sink: int | None = arg(None, "Sink frames of the rolling cache (default: config).")
    window: int | None = arg(None, "Rolling window in frames (default: training length).")
    seed: int = arg(0, "Video i uses seed + i.")


class GenerateRun(RunConfig):
    model: PolicySection = PolicySection()
    generate: GenerateSettings = GenerateSettings()
    hardware: Hardware = Hardware()


def host_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_video_memory(cfg: ModelConfig, frames: int, what: str | None = None) -> None:
    """Refuse a video whose latents and decoded float32 frames (held whole until the MP4 is written) would
    not fit in this machine's memory, before it is generated (`frames`: latent frames, rounded up to whole
    chunks; `what`: how the message names them, default the --frames flag)."""
    what = what or f"--frames {frames}"
    c = cfg.sampler.chunk_frames
    frames = -(-frames // c) * c
    wan = cfg.codec.kind == "wan-vae"
    temporal, spatial = (4, 8) if wan else (1, math.isqrt(cfg.latent.channels // 3))
    lat = cfg.latent
    pixel = 3 * lat.height * spatial * lat.width * spatial * 4  # one decoded float32 frame
    per_frame = temporal * pixel + lat.channels * lat.height * lat.width * 4
    need, have = frames * per_frame + (1 - temporal) * pixel, host_memory()
    if need > have:
        most = max(c, (have - (1 - temporal) * pixel) // per_frame // c * c)
        raise ValueError(f"{what}: one video would hold {need / 2**30:.1f} GiB in memory ({frames} latent "
                         f"frames, {temporal * (frames - 1) + 1} decoded frames of 3x{lat.height * spatial}x"
                         f"{lat.width * spatial} float32), more than this machine's {have / 2**30:.1f} GiB: give "
                         f"--frames {most} or fewer")  # fmt: skip


def plan(lines: Sequence[str], policy: Pipeline, fps: float, frames: int | None) -> list[list[tuple[str, int, bool]]]:
    """(prompt, chunks, hard_cut) per scene of every line; errors name the line. `frames`: total latent
    frames per video (rounded up to whole chunks) or None (scenes default to the training length)."""
    cfg = policy.config
    c = cfg.sampler.chunk_frames
    secs = chunk_seconds(c, getattr(policy.codec, "temporal", 1), fps)
    total = None if frames is None else -(-frames // c)
    out = []
    for i, line in enumerate(lines, 1):
        try:
            scenes = parse_scenes(line)
            chunks = scene_chunks(scenes, secs, cfg.num_chunks, total)
        except ValueError as e:
            raise ValueError(f"prompt line {i}: {e}") from None
        out.append([(s.prompt, n, s.hard_cut) for s, n in zip(scenes, chunks, strict=True)])
    return out


def rolling_cache(policy: Pipeline, longest_run: int, sink: int | None, window: int | None) -> KVCache | None:
    """A rolling cache when asked for (window) or when a run of chunks without a hard cut is longer than
    the training length and the config has no window (then: the training length, in frames)."""
    cfg = policy.config
    c = cfg.sampler.chunk_frames
    if window is None and cfg.cache.window is None and longest_run <= cfg.num_chunks:
        return None
    win = window or cfg.cache.window or cfg.num_chunks * c
    if win < c:
        raise ValueError(f"--window {win} frames is shorter than one chunk ({c} frames)")
    sink = cfg.cache.sink if sink is None else sink
    if not cfg.recomputes_within(sink, win):
        raise ValueError(f"--window {win} / --sink {sink}: this model recomputes one chunk of context before each "
                         f"chunk (cache recompute_context), which needs --window {2 * c} and --sink 0")  # fmt: skip
    return KVCache.for_model(policy.model, 1, cfg.tokens_per_frame, sink=sink, window=win,
                             recompute_context=cfg.cache.recompute_context)  # fmt: skip


def generate_video(
    policy: Pipeline,
    scenes: Sequence[tuple[str, int, bool]],
    seed: int,
    sink: int | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One video [F, 3, H, W] in [0, 1] from a scene plan (prompt, chunks, hard_cut), with a rolling cache
    when a run of chunks without a hard cut is longer than the training length (or a window is asked)."""
    runs, run = [], 0
    for _, n, cut in scenes:
        run = n if cut else run + n
        runs.append(run)
    return policy.generate_scenes(scenes, seed, rolling_cache(policy, max(runs), sink, window))


def generate(
    policy: Pipeline,
    lines: Sequence[str],
    out: str | Path,
    seed: int = 0,
    fps: float = 16.0,
    frames: int | None = None,
    sink: int | None = None,
    window: int | None = None,
    progress: bool = True,
    run: str | None = None,
) -> list[Path]:
    """Write ``out/NNNN.mp4`` per line, ``out/generate.json`` (lines, seeds, scene plans) and `run` as
    ``run.yaml``: staged, so a previous output is replaced in one step at the end, never mixed with it."""
    plans = plan(lines, policy, fps, frames)
    longest = max(sum(n for _, n, _ in scenes) for scenes in plans) * policy.config.sampler.chunk_frames
    check_video_memory(policy.config, longest, f"the longest line's scenes ({longest} latent frames)")
    check_stage("generate", policy.config, policy.placement, gen_frames=longest)
    out = Path(out)
    policy.text.prefetch([p for scenes in plans for p, _, _ in scenes])  # every prompt encoded once
    record = []
    with output_folder(out, "generate", run) as tmp:
        for i, (line, scenes) in enumerate(zip(lines, plans, strict=True)):
            video = generate_video(policy, scenes, seed + i, sink, window)
            name = save_mp4(video, tmp / f"{i:04d}.mp4", fps=fps).name
            record.append({"line": line, "seed": seed + i, "scenes": [list(s) for s in scenes],
                           "frames": video.shape[0], "file": name})  # fmt: skip
            if progress:
                print(f"{out / name}: {video.shape[0]} frames, {len(scenes)} scene(s)", flush=True)
        videos = {"policy": policy.policy_id, "fps": fps, "videos": record}
        (tmp / "generate.json").write_text(json.dumps(videos, indent=1))
    return [out / r["file"] for r in record]


def run_generate(cfg: GenerateRun, out: str | Path) -> list[Path]:
    """The `generate` stage: load the policy, write the videos and ``run.yaml`` into `out`."""
    g, m = cfg.generate, cfg.model
    if not g.prompts:
        raise ValueError("give a PROMPT argument or --prompts FILE (one of them)")
    if g.frames is not None:  # before any model loads
        check_video_memory(resolve_config(m.config, m.wan_dir), g.frames)
    policy = Pipeline.of_section(m, Placement.of(cfg.hardware))
    return generate(policy, g.prompts, out, seed=g.seed, fps=g.fps, frames=g.frames, sink=g.sink, window=g.window,
                    run=run_record(cfg, "generate"))  # fmt: skip


def generate_stage(cfg: GenerateRun, prompt: str | None, out: Path) -> str:
    """The `generate` command: a PROMPT argument or ``--prompts FILE`` (one of them)."""
    if prompt is not None and cfg.generate.prompts:
        raise ValueError("give a PROMPT argument or --prompts FILE (one of them)")
    paths = run_generate(cfg.replace(prompts=(prompt,)) if prompt is not None else cfg, out)
    return f"wrote {len(paths)} video(s) to {out}"
