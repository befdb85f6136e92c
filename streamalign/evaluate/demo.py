"""`streamalign demo`: the whole pipeline on the shapes world, stage by stage through files on disk.

collect (shipped model) -> train semi -> train on -> merge sweep (select s_on) -> evaluate base vs the
selected model on held-out prompts -> report. Every stage writes into its own folder under `out`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..collect.collector import CollectConfig, collect
from ..io.files import write_atomic
from ..io.outputs import open_output
from ..models.placement import Placement
from ..pipeline import Pipeline
from ..schemas.sections import Hardware
from ..train.config import TrainConfig
from ..train.loop import train
from ..worlds.shapes import held_in_prompts, held_out_prompts
from ..worlds.shapes.rewards import SHAPES_METRICS, SHAPES_REWARDS
from .config import DemoRun
from .report import EvalSettings, ModelSpec, evaluate, spread
from .sweep import merge_sweep


@dataclass(frozen=True)
class DemoSettings:
    train_prompts: int = 8  # every 31st held-in prompt: all colours, shapes, directions, backgrounds
    groups: int = 64
    group_size: int = 8
    semi_steps: int = 40
    on_iterations: int = 15
    on_groups: int = 8
    lr: float = 3e-5  # with CoPO's tau-scale 10 / clip eps 0.2: the sweep's healthiest gain (README)
    scales: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    sweep_seeds: int = 16  # fresh seeds per training prompt for the sweep
    eval_prompts: int = 36  # held-out prompts in the final evaluation
    eval_seeds: int = 4
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(groups=16, group_size=6, semi_steps=8, on_iterations=3, on_groups=4, scales=(0.0, 0.5, 1.0),
                   sweep_seeds=4, eval_prompts=12, eval_seeds=2)  # fmt: skip


def run_demo(out: str | Path, settings: DemoSettings, progress: bool = True, hardware: Hardware | None = None) -> dict:
    """Run every stage into `out` on `hardware` (default: auto); re-running continues (collect skips
    finished shards, training resumes). Returns (and writes to ``demo.json``) the headline numbers."""
    out, hardware = Path(out), hardware or Hardware()
    place, hw = Placement.of(hardware), hardware.model_dump()
    open_output(out, "demo")
    st = settings
    t0, times = time.time(), {}
    prompts = tuple(p.text for p in held_in_prompts()[::31][: st.train_prompts])

    def stage(name: str, t: float) -> None:
        times[name] = round(time.time() - t, 1)
        if progress:
            print(f"[demo] {name} done in {times[name]:.1f} s", flush=True)

    t = time.time()
    ccfg = CollectConfig(prompts=prompts, groups=st.groups, group_size=st.group_size, seed=st.seed)
    collect(Pipeline.load("shapes", placement=place), ccfg, out / "buffer", progress=progress)
    stage("collect", t)
    t = time.time()
    semi = TrainConfig(mode="semi", buffer=str(out / "buffer"), steps=st.semi_steps, lr=st.lr, seed=st.seed,
                       hardware=hw)  # fmt: skip
    train(semi, out / "semi", resume="auto", progress=progress)
    stage("train semi", t)
    t = time.time()
    on = TrainConfig(mode="on", prompts=prompts, steps=st.on_iterations, batch_groups=st.on_groups,
                     group_size=st.group_size, lr=st.lr, seed=st.seed, hardware=hw)  # fmt: skip
    train(on, out / "on", resume="auto", progress=progress)
    stage("train on", t)
    t = time.time()
    sweep_settings = EvalSettings(rewards=SHAPES_REWARDS, metrics=SHAPES_METRICS, seeds_per_prompt=st.sweep_seeds)
    sweep = merge_sweep(out / "on" / "adapter", out / "semi" / "adapter", st.scales, prompts, sweep_settings,
                        out / "merge", placement=place)  # fmt: skip
    stage("merge sweep", t)
    t = time.time()
    held_out = spread([p.text for p in held_out_prompts()], st.eval_prompts)
    models = [ModelSpec("base")]
    if sweep["selected_scale"] is not None:
        models.append(ModelSpec(f"merged-s{sweep['selected_scale']:g}", lora=sweep["adapter"]))
    else:
        models.append(ModelSpec("semi-only", lora=str(out / "semi" / "adapter")))
    eval_settings = EvalSettings(rewards=SHAPES_REWARDS, metrics=SHAPES_METRICS, seeds_per_prompt=st.eval_seeds,
                                 seed=3_000_000)  # fmt: skip
    report = evaluate(models, held_out, eval_settings, out / "report", place)
    stage("evaluate", t)
    m = report["models"][models[1].name]["vs_base"]
    headline = {
        "settings": asdict(st),
        "seconds": round(time.time() - t0, 1),
        "stage_seconds": times,
        "selected_scale": sweep["selected_scale"],
        "selection": sweep["selection"],
        "evaluated": models[1].name,
        "held_out_composite": m["composite"],
        "held_out_background_cleanliness": m["background_cleanliness"],
        "report": str(out / "report" / "report.md"),
    }
    write_atomic(out / "demo.json", json.dumps(headline, indent=1))
    return headline


def headline_lines(h: dict) -> list[str]:
    """What `demo` prints: time, the selection, and the held-out result vs the base."""
    c, b = h["held_out_composite"], h["held_out_background_cleanliness"]
    return [f"demo finished in {h['seconds']:.0f} s; selection: {h['selection']}",
            f"held-out prompts, {h['evaluated']} vs base: composite {c['base']:.4f} -> {c['model']:.4f} "
            f"({c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}]); background_cleanliness "
            f"{b['base']:.4f} -> {b['model']:.4f} ({b['diff']:+.4f})", f"report: {h['report']}"]  # fmt: skip


def demo_stage(cfg: DemoRun, out: Path) -> str:
    settings = DemoSettings.quick() if cfg.quick else DemoSettings()
    return "\n".join(headline_lines(run_demo(out, settings, hardware=cfg.hardware)))
