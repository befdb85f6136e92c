"""`streamalign evaluate`: fixed prompts and seeds for every model (paired), every reward and OOD metric,
and a report: ``report.json``, ``report.md``, ``diffs.png`` and ``samples/`` (GIFs, frame grids)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.media import frame_grid, save_gif, save_mp4
from ..io.outputs import output_folder
from ..io.plots import save, subplots
from ..models.checkpoint import NO_LORA
from ..models.placement import CPU_FP32, Placement
from ..pipeline import Pipeline, resolve_config
from ..plan import check_stage, stage_reward_hold
from ..rewards import plan as _reward_planners  # noqa: F401  (registers the reward models' planners)
from ..schemas.run import run_record
from ..schemas.sections import ModelSection
from ..scoring import paired_differences, score_policy
from .config import EvalSettings, EvaluateRun, named
from .vbench import VBenchExport


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: the policy of the model section (its base weights and shipped LoRA), optionally
    with a peft adapter folder merged on top, or full merged weights (``checkpoint``: the shipped LoRA is
    in them already)."""

    name: str
    checkpoint: str | None = None
    lora: str | None = None

    def load(self, model: ModelSection, placement: Placement = CPU_FP32) -> Pipeline:
        if self.checkpoint is not None:
            return Pipeline.load(model.config, self.checkpoint, self.lora, None, model.wan_dir, placement, NO_LORA)
        return Pipeline.of_section(model, placement, self.lora)


def pairs(prompts: Sequence[str], seeds_per_prompt: int, seed: int) -> tuple[list[str], list[int]]:
    """Every prompt repeated `seeds_per_prompt` times, with seeds seed, seed+1, ... over all pairs."""
    ps = [p for p in prompts for _ in range(seeds_per_prompt)]
    return ps, [seed + i for i in range(len(ps))]


def spread(items: Sequence, k: int) -> list:
    """k items spread over the list: indices i * step mod n with a step coprime to n (distinct, and for the
    shapes prompt lists, mixing colours, directions and backgrounds)."""
    n = len(items)
    step = next((s for s in (7, 11, 13, 17, 19, 23, 29, 31) if math.gcd(s, n) == 1), 1)
    return [items[(i * step) % n] for i in range(min(k, n))]


def evaluate(
    models: Sequence[ModelSpec],
    prompts: Sequence[str],
    settings: EvalSettings,
    out: str | Path,
    placement: Placement = CPU_FP32,
    export: VBenchExport | None = None,
    record: str | None = None,
) -> dict:
    """Score every model on the same (prompt, seed) pairs; the first model is the base of the paired
    differences. Writes the report (and `record` as ``run.yaml``) into `out`, staged: it replaces a
    previous report in one step at the end (``io.outputs.output_folder``)."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    if not prompts:
        raise ValueError("no prompts to evaluate")
    if len(set(prompts)) != len(prompts):
        dup = next(p for p in prompts if list(prompts).count(p) > 1)
        raise ValueError(f"prompt {dup!r} is listed twice: list each once and raise --seeds for more samples")
    sp = check_stage("evaluate", resolve_config(settings.config, settings.wan_dir), placement, settings,
                     eval_batch=settings.batch, videos=len(prompts) * settings.seeds_per_prompt)  # fmt: skip
    # the plan's decision (auto) for this GPU, so the scoring below holds or offloads the reward models by it
    settings = settings.model_copy(update={"reward_offload": stage_reward_hold(settings.reward_offload, sp)})
    with output_folder(out, "evaluate", record) as tmp, export_to(export) as etmp:
        return _evaluate(models, list(prompts), settings, tmp, placement, export, etmp)


@contextlib.contextmanager
def export_to(export: VBenchExport | None) -> Iterator[Path | None]:
    """The staged folder of a VBench export (swapped in whole with its export.json and vbench.sh), or None."""
    if export is None:
        yield None
        return
    with output_folder(export.out, "vbench export") as tmp:  # the --out rules hold for the export folder too
        yield tmp
        export.finish(tmp)


def _evaluate(models: Sequence[ModelSpec], prompts: list[str], st: EvalSettings, out: Path, placement: Placement,
              export: VBenchExport | None = None, export_dir: Path | None = None) -> dict:  # fmt: skip
    reward = st.reward(load=True)  # kept reward models load before the first rollout: its batch counts them
    ps, seeds = pairs(prompts, st.seeds_per_prompt, st.seed)
    scores: dict[str, dict[str, torch.Tensor]] = {}
    sample_videos: dict[str, torch.Tensor] = {}
    chosen = spread(list(zip(ps, seeds, strict=True)), st.samples)  # the (prompt, seed) pairs shown as samples
    for m in models:
        policy = m.load(st, placement)
        policy.text.prefetch(prompts)  # once per process: later models find them cached
        scores[m.name] = score_policy(policy, ps, seeds, reward, st.batch)
        # kept for the media only: 8-bit frames on the host
        if chosen:  # --samples 0: no media
            sample_videos[m.name] = policy.generate([p for p, _ in chosen], [s for _, s in chosen], st.batch,
                                                    uint8=True)  # fmt: skip
        if export is not None:
            export.write(export_dir, m.name, policy.generate)
    base = models[0].name
    report = {
        "prompts": prompts,
        "seeds_per_prompt": st.seeds_per_prompt,
        "seed": st.seed,
        "pairs": len(ps),
        "rewards": reward.weights,
        "metrics": [r.label for r in reward.metrics],
        "base": base,
        "models": {},
    }
    for m in models:
        s = scores[m.name]
        entry = {
            "checkpoint": m.checkpoint,
            "lora": m.lora,
            "means": {k: float(v.mean()) for k, v in s.items()},
            "per_prompt": {
                p: {k: float(v[i * st.seeds_per_prompt : (i + 1) * st.seeds_per_prompt].mean()) for k, v in s.items()}
                for i, p in enumerate(prompts)
            },
        }
        if m.name != base:
            entry["vs_base"] = paired_differences(scores[base], s, st.n_boot, st.seed)
        report["models"][m.name] = entry
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot_differences(report, out / "diffs.png")
    samples = [{"index": i, "prompt": p, "seed": s, "grid": f"grid-{i}.png"} for i, (p, s) in enumerate(chosen)]
    for i, (p, s) in enumerate(chosen):
        frame_grid({n: v[i] for n, v in sample_videos.items()}, out / "samples" / f"grid-{i}.png",
                   caption=f"{p}  (seed {s})")  # fmt: skip
        for n, v in sample_videos.items():
            save_gif(v[i], out / "samples" / f"{n}-{i}.gif")
            save_mp4(v[i], out / "samples" / f"{n}-{i}.mp4")
    (out / "samples").mkdir(exist_ok=True)
    (out / "samples" / "samples.json").write_text(json.dumps(samples, indent=1))  # what every sample shows
    return report


def markdown(report: dict) -> str:
    """Means per model, paired differences vs base with 95% bootstrap intervals, per-prompt composite."""
    names = list(report["models"])
    keys = list(report["models"][names[0]]["means"])
    lines = [
        f"# Evaluation: {len(names)} models, {len(report['prompts'])} prompts x {report['seeds_per_prompt']} seeds "
        f"({report['pairs']} paired videos per model, seeds {report['seed']}..)",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    ood = set(report["metrics"])
    for k in keys:
        cells = []
        for n in names:
            m = report["models"][n]
            cell = f"{m['means'][k]:.4f}"
            if "vs_base" in m:
                d = m["vs_base"][k]
                cell += f" ({d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}])"
            cells.append(cell)
        lines.append(f"| {k}{' (OOD)' if k in ood else ''} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Differences are paired vs `{report['base']}` (same prompts and noise) with 95% bootstrap intervals.",
        "",
    ]
    lines += ["## Composite per prompt", "", "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for p in report["prompts"]:
        lines.append(
            f"| {p} | " + " | ".join(f"{report['models'][n]['per_prompt'][p]['composite']:.4f}" for n in names) + " |"
        )
    lines += [
        "",
        "Samples: `samples/grid-*.png` (one row per model, same seed) and `samples/<model>-*.mp4` / `.gif`.",
        "",
    ]
    return "\n".join(lines)


def plot_differences(report: dict, png: Path) -> None:
    """Paired difference vs base per metric (bars) with the 95% interval (error bars), one colour per model."""
    others = [n for n in report["models"] if n != report["base"]]
    keys = list(report["models"][report["base"]]["means"])
    fig, ax = subplots(figsize=(max(6, 1.1 * len(keys)), 3.4))
    width = 0.8 / max(1, len(others))
    for j, n in enumerate(others):
        d = report["models"][n]["vs_base"]
        xs = [i + (j - (len(others) - 1) / 2) * width for i in range(len(keys))]
        mean = [d[k]["diff"] for k in keys]
        err = [[d[k]["diff"] - d[k]["ci_low"] for k in keys], [d[k]["ci_high"] - d[k]["diff"] for k in keys]]
        ax.bar(xs, mean, width, yerr=err, capsize=3, label=n)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"paired difference vs {report['base']}")
    if others:
        ax.legend(fontsize=8)
    save(fig, png, dpi=110)


def run_evaluate(cfg: EvaluateRun, out: str | Path) -> dict:
    """The `evaluate` stage: the base and every ``--lora`` / ``--weights`` model (named NAME=PATH or after
    their run folder) on the resolved prompts; the report and ``run.yaml`` in `out`."""
    st = cfg.eval.resolved()
    models = [ModelSpec("base")]
    for kind, specs in (("lora", cfg.models.lora), ("checkpoint", cfg.models.weights)):
        for name, path in map(named, specs):
            if not Path(path).exists():
                raise FileNotFoundError(f"{'adapter' if kind == 'lora' else 'weights'} {path} does not exist")
            models.append(ModelSpec(name, **{kind: path}))
    return evaluate(models, st.prompts, st, out, Placement.of(cfg.hardware), cfg.vbench.exporter(list(st.prompts)),
                    run_record(cfg.replace(eval=st), "evaluate"))  # fmt: skip


def summary_lines(report: dict, out: str | Path) -> list[str]:
    """What `evaluate` prints: every model's composite and its paired difference vs the base."""
    lines = []
    for name, m in report["models"].items():
        d = m.get("vs_base", {}).get("composite")
        extra = f" ({d['diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] vs base)" if d else ""
        lines.append(f"{name}: composite {m['means']['composite']:.4f}{extra}")
    return [*lines, f"report: {Path(out) / 'report.md'}"]


def evaluate_stage(cfg: EvaluateRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    return "\n".join(summary_lines(run_evaluate(cfg, out), out))
