"""`streamalign merge`: base + s_semi LoRA_semi + s_on LoRA_on for a sweep of s_on, each scored on the
same (prompt, seed) pairs, and the dual-criterion selection (AR-CoPO Table 3)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..adapters.merge import Selection, check_adapter_modules, combine_adapters, save_merged_weights, select_scale
from ..io.files import require_paths
from ..io.outputs import output_folder
from ..io.plots import save, subplots
from ..models.checkpoint import NO_LORA, read_adapter, shipped_lora
from ..models.placement import CPU_FP32, Placement
from ..pipeline import base_checkpoint, resolve_config
from ..plan import check_stage, stage_reward_hold
from ..rewards import plan as _reward_planners  # noqa: F401  (registers the reward models' planners)
from ..schemas.config import ModelConfig
from ..schemas.run import run_record
from ..scoring import paired_differences, score_policy
from ..worlds import default_ood_metric
from .config import EvalSettings, MergeRun
from .report import ModelSpec, export_to, pairs
from .vbench import VBenchExport, results_metric


def merge_sweep(
    on: str | Path,
    semi: str | Path | None,
    scales: Sequence[float],
    prompts: Sequence[str],
    settings: EvalSettings,
    out: str | Path,
    s_semi: float = 1.0,
    ood: str = "background_cleanliness",
    ood_tolerance: float = 0.0,
    full_weights: bool = False,
    placement: Placement = CPU_FP32,
    ood_results: str | Path | None = None,
    export: VBenchExport | None = None,
    record: str | None = None,
) -> dict:
    """Score the base and every s_on in `scales`; write ``sweep.json``, ``sweep.md``, ``sweep.png``,
    ``adapters/s<scale>/`` and, for the selected scale, ``adapter/`` (+ ``merged.safetensors``), with
    `record` as ``run.yaml``: staged, replacing a previous sweep in one step at the end."""
    if not scales or any(s < 0 for s in scales):
        raise ValueError(f"--scales must be non-negative numbers, got {list(scales)}")
    reward = settings.reward()
    if ood_results is None and ood not in reward.names:
        raise ValueError(f"--ood-metric {ood!r} is not scored (scored: {', '.join(reward.names)}; or "
                         "vbench:<dimension> with --ood-results)")  # fmt: skip
    if ood_results is not None:  # every row's VBench score present before any scoring
        for row in ["base", *(f"s{s:g}" for s in sorted(set(scales)))]:
            results_metric(ood_results, row, ood)
    given = [f for f in (semi, on) if f is not None]  # refuse a bad adapter before any scoring
    check_adapter_modules(given, [read_adapter(f)[1] for f in given], settings.config)
    sp = check_stage("evaluate", resolve_config(settings.config, settings.wan_dir), placement, settings,
                     eval_batch=settings.batch, videos=len(prompts) * settings.seeds_per_prompt)  # fmt: skip
    # held or offloaded by the plan's decision for this GPU; kept ones load now, before the first rollout
    reward = settings.reward(stage_reward_hold(settings.reward_offload, sp), load=True)
    with output_folder(out, "merge", record) as tmp, export_to(export) as etmp:
        return _sweep(on, semi, scales, prompts, settings, reward, tmp, Path(out), s_semi, ood, ood_tolerance,
                      full_weights, placement, ood_results, export, etmp)  # fmt: skip


def _sweep(on, semi, scales, prompts, settings, reward, tmp: Path, out: Path, s_semi, ood, ood_tolerance, full_weights,
           placement: Placement, ood_results=None, export=None, export_dir=None):  # fmt: skip
    ps, seeds = pairs(prompts, settings.seeds_per_prompt, settings.seed)
    base_policy = ModelSpec("base").load(settings, placement)
    base_policy.text.prefetch(prompts)  # once per process: every scale's pipeline finds them cached
    base = score_policy(base_policy, ps, seeds, reward, settings.batch)
    if export is not None:
        export.write(export_dir, "base", base_policy.generate)
    rows, diffs, folders = {}, {}, {}

    def parts(s_on: float) -> list:
        return ([(semi, s_semi)] if semi is not None else []) + [(on, s_on)]

    for s in sorted(set(scales)):
        folders[s] = combine_adapters(parts(s), tmp / "adapters" / f"s{s:g}", settings.config)
        spec = ModelSpec(f"s{s:g}", lora=str(folders[s]))
        policy = spec.load(settings, placement)
        sc = score_policy(policy, ps, seeds, reward, settings.batch)
        if export is not None:
            export.write(export_dir, spec.name, policy.generate)
        rows[s] = {k: float(v.mean()) for k, v in sc.items()}
        diffs[s] = paired_differences(base, sc, settings.n_boot, settings.seed)
        if ood_results is not None:  # the OOD criterion from VBench's results for this row
            rows[s][ood] = results_metric(ood_results, spec.name, ood)
    base_means = {k: float(v.mean()) for k, v in base.items()}
    if ood_results is not None:
        base_means[ood] = results_metric(ood_results, "base", ood)
    sel = select_scale(rows, base_means, "composite", ood, ood_tolerance)
    result = {
        "semi": str(semi) if semi is not None else None,
        "on": str(on),
        "s_semi": s_semi if semi is not None else None,
        "prompts": list(prompts),
        "pairs": len(ps),
        "seed": settings.seed,
        "ood_metric": ood,
        "ood_tolerance": ood_tolerance,
        "base": base_means,
        "rows": {f"{s:g}": {"means": rows[s], "vs_base": diffs[s]} for s in rows},
        "selected_scale": sel.scale,
        "selection": sel.reason,
    }
    if sel.scale is not None:
        shutil.copytree(folders[sel.scale], tmp / "adapter")
        result["adapter"] = str(out / "adapter")
        if full_weights:
            w0 = base_checkpoint(ModelConfig.load(settings.config), settings.checkpoint)
            save_merged_weights(settings.config, w0, parts(sel.scale), tmp / "merged.safetensors",
                                shipped_lora(ModelConfig.load(settings.config), settings.base_lora),
                                settings.base_lora_alpha)  # fmt: skip
            result["merged_weights"] = str(out / "merged.safetensors")
    (tmp / "sweep.json").write_text(json.dumps(result, indent=1))
    (tmp / "sweep.md").write_text(sweep_markdown(result, sel))
    plot_sweep(result, tmp / "sweep.png")
    return result


def sweep_markdown(result: dict, sel: Selection) -> str:
    keys = list(result["base"])
    semi = f"s_semi = {result['s_semi']:g}, " if result["semi"] else ""
    lines = [
        f"# Merge sweep ({semi}s_on swept; {result['pairs']} paired videos per row)",
        "",
        "| s_on | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
        "| base | " + " | ".join(f"{result['base'][k]:.4f}" for k in keys) + " |",
    ]
    for s, row in result["rows"].items():
        cells = [f"{row['means'][k]:.4f}" + (f" ({row['vs_base'][k]['diff']:+.4f})" if k in row["vs_base"] else "")
                 for k in keys]  # fmt: skip
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    pick = "base model kept" if sel.scale is None else f"s_on = {sel.scale:g}"
    lines += ["", f"**Selected: {pick}** — {sel.reason}.", ""]
    return "\n".join(lines)


def plot_sweep(result: dict, png: Path) -> None:
    """In-domain composite and the OOD metric against s_on, base values as dashed lines."""
    xs = [float(s) for s in result["rows"]]
    fig, (a, b) = subplots(1, 2, figsize=(8, 3.2))
    for ax, key in ((a, "composite"), (b, result["ood_metric"])):
        ax.plot(xs, [r["means"][key] for r in result["rows"].values()], "o-")
        ax.axhline(result["base"][key], ls="--", color="gray", label="base")
        if result["selected_scale"] is not None:
            ax.axvline(result["selected_scale"], color="green", lw=0.8, label="selected")
        ax.set_xlabel("s_on")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
    save(fig, png, dpi=110)


def run_merge(cfg: MergeRun, out: str | Path) -> dict:
    """The `merge` stage: the sweep on the resolved prompts; the results and ``run.yaml`` in `out`. Every
    default a world provides (prompts, rewards, metrics, the OOD metric) is resolved, or asked for in one
    line, before anything loads."""
    st = cfg.eval.resolved()
    ood = default_ood_metric(ModelConfig.load(st.config), cfg.merge.ood_metric)
    m = cfg.merge.model_copy(update={"ood_metric": ood})
    require_paths((m.on, "on-policy adapter"), (m.semi, "semi-on-policy adapter"), (st.checkpoint, "checkpoint"),
                  (st.base_lora if st.base_lora != NO_LORA else None, "base LoRA"))  # fmt: skip
    return merge_sweep(m.on, m.semi, m.scales, st.prompts, st, out, m.s_semi, m.ood_metric, m.ood_tolerance,
                       m.full_weights, Placement.of(cfg.hardware), m.ood_results,
                       cfg.vbench.exporter(list(st.prompts)),
                       run_record(cfg.replace(eval=st, merge=m), "merge"))  # fmt: skip


def merge_stage(cfg: MergeRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    r = run_merge(cfg, out)
    pick = f"selected adapter: {r['adapter']}" if r["selected_scale"] is not None else "no adapter written"
    return (Path(out) / "sweep.md").read_text() + "\n" + pick
