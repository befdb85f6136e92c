"""`streamalign experiment`: the AR-CoPO analyses, runnable on any model.

- ``noise-sources`` (AR-CoPO Fig. 6): how much the finished video varies when ONLY the pivot chunk's
  initial noise changes vs when only ONE of its solver (re-noising) noises changes, per pivot position.
- ``objectives`` (AR-CoPO Fig. 2 / Table 2): copo, copo without the clip (off-policy), nft and sde-grpo
  trained on-policy with the same prompts, seeds and budget; reward curves on fixed fresh seeds, the OOD
  metric, and each final adapter's paired difference vs the base.
- ``regimes`` (AR-CoPO Table 2): on-policy vs semi-on-policy vs off-policy (semi without the clip) CoPO at
  equal budget (rollout groups and updates), paired in-domain and OOD differences vs the base.
- ``sweep``: CoPO over modes x lr x tau scale x clip eps at the regimes' equal budget; per cell the paired
  gain, OOD change, clip fraction and approx KL (how the defaults were chosen).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..collect.collector import CollectConfig, collect
from ..io.outputs import output_folder
from ..io.plots import save, subplots
from ..io.results import table, write_results
from ..models.placement import Placement
from ..pipeline import Pipeline
from ..rewards import CompositeReward
from ..rewards.sources import reward_of
from ..schemas.config import ModelConfig
from ..schemas.run import provenance
from ..schemas.sections import ResultsOut
from ..scoring import paired_differences, score_policy
from ..train.config import TrainConfig
from ..train.health import moved_rows
from ..train.loop import train
from ..train.metrics import read_metrics
from ..worlds import default_prompts, default_rewards
from .config import NoiseSourcesRun, ObjectivesRun, RegimesRun, SweepRun, SweepStudy
from .report import ModelSpec, spread


@torch.no_grad()
def noise_sources(
    policy: Pipeline, prompts: Sequence[str], reward: CompositeReward, seeds: int = 4, group_size: int = 8,
    strength: float = 0.5,
) -> list[dict]:  # fmt: skip
    """Rows per (pivot, source): mean over prompts x seeds of the per-pixel variance of the decoded videos
    across the G branches, and of the composite's within-group std. Sources: 'initial' and 'solver k'."""
    sampler = policy.sampler
    n, t = policy.config.num_chunks, len(sampler.schedule)
    sources = [("initial", None)] + [(f"solver {k}", k) for k in range(1, t)]
    rows = []
    for pivot in range(n):
        for name, k in sources:
            var, std = [], []
            for i, prompt in enumerate(prompts):
                text = policy.text.encode([prompt])
                for j in range(seeds):
                    bank = sampler.noise_bank(10_000 * i + j)
                    fork = "initial" if k is None else "solver"
                    grp = sampler.fork_group(text, bank, pivot, group_size, strength, fork=fork,
                                             solver_steps=None if k is None else [k])  # fmt: skip
                    videos = policy.decode(grp.videos()).float()
                    var.append(float(videos.var(0, unbiased=False).mean()))
                    std.append(float(reward(videos, [prompt] * group_size)["composite"].std(unbiased=False)))
            rows.append({"pivot": pivot, "source": name, "pixel_variance": sum(var) / len(var),
                         "composite_std": sum(std) / len(std), "groups": len(var)})  # fmt: skip
    return rows


def noise_sources_report(rows: list[dict], out: Path) -> None:
    """``noise_sources.md`` (table), ``.json`` and ``.png`` (variance per pivot, one line per source)."""
    sources = list(dict.fromkeys(r["source"] for r in rows))
    pivots = sorted({r["pivot"] for r in rows})
    cell = {(r["pivot"], r["source"]): r for r in rows}
    lines = ["# Noise sources (AR-CoPO Fig. 6): per-pixel variance of the video across branches", "",
             "| pivot | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]  # fmt: skip
    for p in pivots:
        lines.append(f"| {p} | " + " | ".join(f"{cell[p, s]['pixel_variance']:.2e}" for s in sources) + " |")
    lines += ["", "Within-group std of the composite reward:", "", "| pivot | " + " | ".join(sources) + " |",
              "|---|" + "---|" * len(sources)]  # fmt: skip
    for p in pivots:
        lines.append(f"| {p} | " + " | ".join(f"{cell[p, s]['composite_std']:.4f}" for s in sources) + " |")
    (out / "noise_sources.md").write_text("\n".join(lines) + "\n")
    (out / "noise_sources.json").write_text(json.dumps(rows, indent=1))
    fig, (a, b) = subplots(1, 2, figsize=(9, 3.3))
    for s in sources:
        a.plot(pivots, [max(cell[p, s]["pixel_variance"], 1e-12) for p in pivots], "o-", label=s)
        b.plot(pivots, [cell[p, s]["composite_std"] for p in pivots], "o-", label=s)
    a.set_yscale("log")
    a.set_ylabel("pixel variance across branches")
    b.set_ylabel("composite std within group")
    for ax in (a, b):
        ax.set_xlabel("pivot chunk")
        ax.set_xticks(pivots)
    a.legend(fontsize=8)
    save(fig, out / "noise_sources.png", dpi=110)


def run_noise_sources(cfg: NoiseSourcesRun, out: str | Path) -> list[dict]:
    """The `experiment noise-sources` stage: ``noise_sources.md/json/png`` in `out`."""
    m, st = cfg.model, cfg.study
    policy = Pipeline.of_section(m, Placement.of(cfg.hardware))
    texts = spread(list(default_prompts(policy.config, cfg.prompts.prompts, cfg.prompts.prompt_set)), st.n_prompts)
    policy.text.prefetch(texts)
    reward = reward_of(cfg.rewards, *default_rewards(policy.config, cfg.rewards.rewards, cfg.rewards.metrics))
    with output_folder(out, "experiment noise-sources") as tmp:
        rows = noise_sources(policy, texts, reward, st.seeds, st.group_size)
        noise_sources_report(rows, tmp)
    return rows


def run_objectives(cfg: ObjectivesRun, out: str | Path) -> dict:
    """The `experiment objectives` stage: every objective trained on-policy at equal budget from one base."""
    m, st = cfg.model, cfg.study
    model = ModelConfig.load(m.config)
    texts = tuple(spread(list(default_prompts(model, cfg.prompts.prompts, cfg.prompts.prompt_set)), st.n_prompts))
    base = TrainConfig(mode="on", model=m, prompts=texts, steps=st.iterations, batch_groups=st.batch_groups,
                       group_size=st.group_size, lr=st.lr, eval_every=st.eval_every, seed=st.seed, save_every=10**6,
                       hardware=cfg.hardware.model_dump())  # fmt: skip
    reward = CompositeReward.parse(*default_rewards(model, None, None))
    return compare_objectives(base, st.runs, texts, reward, out, st.eval_seeds)


@dataclass(frozen=True)
class ObjectiveRun:
    name: str
    overrides: dict


OBJECTIVE_RUNS = (
    ObjectiveRun("copo", {"objective": "copo"}),
    ObjectiveRun("copo-offpolicy", {"objective": "copo", "clip": False}),
    ObjectiveRun("nft", {"objective": "nft"}),
    ObjectiveRun("sde-grpo", {"objective": "sde-grpo"}),
    # SDE-GRPO with CoPO's swept clip: its own eps 1e-4 clips ~all ratios, so a failure there could be the clip's
    ObjectiveRun("sde-grpo-eps0.2", {"objective": "sde-grpo", "clip_eps": 0.2}),
    # KV-routed groups (row 0 the anchor): needs a rolling-cache config (--config shapes-long), so not a default run
    ObjectiveRun("kvpo", {"objective": "kvpo"}),
)


def compare_objectives(
    base: TrainConfig, names: Sequence[str], prompts: Sequence[str], reward: CompositeReward, out: str | Path,
    eval_seeds: int = 8, progress: bool = True,
) -> dict:  # fmt: skip
    """Train every objective on-policy from `base` (same prompts, seeds, iterations, groups); write
    ``objectives.md/json/png`` and each run's folder. Evaluation: paired vs the base model on fixed fresh
    seeds (`eval_seeds` per prompt)."""
    runs = [r for r in OBJECTIVE_RUNS if r.name in names]
    unknown = set(names) - {r.name for r in OBJECTIVE_RUNS}
    if unknown:
        raise ValueError(f"unknown objective runs {sorted(unknown)}: choose from {[r.name for r in OBJECTIVE_RUNS]}")
    with output_folder(out, "experiment objectives") as tmp:
        return compare_runs(base, runs, prompts, reward, tmp, eval_seeds, "objectives",
                            "Objectives at equal budget", progress)  # fmt: skip


def compare_runs(
    base: TrainConfig, runs: Sequence[ObjectiveRun], prompts: Sequence[str], reward: CompositeReward, tmp: Path,
    eval_seeds: int, stem: str, title: str, progress: bool = True, extra: dict | None = None,
    report: Callable[[dict, Path, str, str], None] | None = None,
) -> dict:  # fmt: skip
    """Train each run (`base` with its overrides) into ``tmp/<name>``, score its adapter paired vs the base
    model on fixed fresh seeds, and every later run paired vs the first (``vs_first``: the same videos'
    seeds, so the difference between two runs gets its own interval); write ``<stem>.md/json/png`` into
    `tmp`; returns the result."""
    ps = [p for p in prompts for _ in range(eval_seeds)]
    seeds = [4_000_000 + i for i in range(len(ps))]
    m, place = base.model, Placement.of(base.hardware)
    base_scores = score_policy(ModelSpec("base").load(m, place), ps, seeds, reward)
    result: dict = {"prompts": list(prompts), "eval_pairs": len(ps), **(extra or {}),
                    "ood_metrics": [r.label for r in reward.metrics], "runs": {}}  # fmt: skip
    first: dict[str, torch.Tensor] | None = None
    for r in runs:
        cfg = base.replace(**r.overrides, eval_prompts=tuple(ps))  # validated
        summary = train(cfg, tmp / r.name, progress=progress)
        spec = ModelSpec(r.name, lora=str(summary.adapter))
        sc = score_policy(spec.load(m, place), ps, seeds, reward)
        rows = read_metrics(tmp / r.name / "metrics.jsonl")
        moved = moved_rows([row for row in rows if "loss" in row])  # ratio 1 by construction left out
        clip = [row["clip_frac"] for row in moved if "clip_frac" in row]
        kl = [row["approx_kl"] for row in moved if "approx_kl" in row]
        result["runs"][r.name] = {
            "seconds": round(summary.seconds, 1),
            "updates": summary.steps,
            "clip_frac": sum(clip) / len(clip) if clip else None,
            "approx_kl": sum(kl) / len(kl) if kl else None,
            "vs_base": paired_differences(base_scores, sc),
            **({"vs_first": paired_differences(first, sc)} if first is not None else {}),
            "curve": [{k: v for k, v in row.items() if k == "step" or k.startswith("eval_")}
                      for row in rows if "eval_composite" in row],
        }
        first = sc if first is None else first
    (report or runs_report)(result, tmp, stem, title)
    return result


def runs_report(result: dict, out: Path, stem: str, title: str) -> None:
    """``<stem>.md`` (paired differences vs base with intervals), ``<stem>.json``, ``<stem>.png`` (curves)."""
    keys = list(next(iter(result["runs"].values()))["vs_base"]) if result["runs"] else []
    lines = [f"# {title} ({result['eval_pairs']} paired fresh videos per row)", "",
             "| run | updates | seconds | clip frac | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]  # fmt: skip
    for name, r in result["runs"].items():
        cells = [f"{r['vs_base'][k]['diff']:+.4f} [{r['vs_base'][k]['ci_low']:+.3f}, {r['vs_base'][k]['ci_high']:+.3f}]"
                 for k in keys]  # fmt: skip
        clip = "-" if r.get("clip_frac") is None else f"{r['clip_frac']:.2f}"
        lines.append(f"| {name} | {r.get('updates', '-')} | {r['seconds']:.0f} | {clip} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: paired difference vs the base model with its 95% bootstrap interval; clip frac: mean "
              "after the first update.", ""]  # fmt: skip
    names = list(result["runs"])
    pairs = [(n, r["vs_first"]) for n, r in result["runs"].items() if "vs_first" in r]
    if pairs:
        lines += [f"Paired vs {names[0]} (the same fresh videos):", "", "| run | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]  # fmt: skip
        for name, d in pairs:
            cells = [f"{d[k]['diff']:+.4f} [{d[k]['ci_low']:+.3f}, {d[k]['ci_high']:+.3f}]" for k in keys]
            lines.append(f"| {name} - {names[0]} | " + " | ".join(cells) + " |")
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    ood = result.get("ood_metrics") or ["composite"]
    fig, (a, b) = subplots(1, 2, figsize=(9, 3.3))
    for name, r in result["runs"].items():
        steps = [c["step"] for c in r["curve"]]
        a.plot(steps, [c["eval_composite"] for c in r["curve"]], "o-", label=name)
        b.plot(steps, [c.get(f"eval_{ood[0]}", float("nan")) for c in r["curve"]], "o-", label=name)
    a.set_ylabel("composite (fresh seeds)")
    b.set_ylabel(f"{ood[0]} (fresh seeds)")
    for ax in (a, b):
        ax.set_xlabel("update")
    a.legend(fontsize=8)
    save(fig, out / f"{stem}.png", dpi=110)


@dataclass(frozen=True)
class EqualBudget:
    """What every run of an equal-budget study shares: I iterations x B groups of rollouts and I x K updates
    of B groups — on-policy rolls out B fresh groups per iteration and updates K times on them; a semi run
    trains I x K updates on a buffer of the same I x B groups collected once from the base (so each group
    is also used K times)."""

    texts: tuple[str, ...]
    base: TrainConfig  # the on-policy run; a semi run is base.replace(**semi(buffer))
    reward: CompositeReward
    collect: CollectConfig  # the semi runs' buffer
    budget: dict

    @classmethod
    def of(cls, cfg: RegimesRun | SweepRun) -> EqualBudget:
        m, st = cfg.model, cfg.study
        model = ModelConfig.load(m.config)
        texts = tuple(spread(list(default_prompts(model, cfg.prompts.prompts, cfg.prompts.prompt_set)), st.n_prompts))
        rewards, metrics = default_rewards(model, cfg.rewards.rewards, cfg.rewards.metrics)
        reward = reward_of(cfg.rewards, rewards, metrics)  # checked before any model loads
        sources = cfg.rewards.model_dump(exclude={"rewards", "metrics"})
        base = TrainConfig(mode="on", model=m, prompts=texts, steps=st.iterations, batch_groups=st.batch_groups,
                           group_size=st.group_size, updates_per_iter=st.updates_per_iter, lr=st.lr,
                           eval_every=st.eval_every, seed=st.seed, save_every=10**6, rewards=rewards,
                           metrics=metrics, hardware=cfg.hardware.model_dump(), **sources)  # fmt: skip
        groups, updates = st.iterations * st.batch_groups, st.iterations * st.updates_per_iter
        ccfg = CollectConfig(prompts=texts, groups=groups, group_size=st.group_size, seed=st.seed,
                             rewards=rewards, metrics=metrics, **sources)  # fmt: skip
        budget = {"rollout_groups": groups, "updates": updates, "groups_per_update": st.batch_groups}
        return cls(texts, base, reward, ccfg, budget)

    def semi(self, buffer: Path) -> dict:
        """The overrides of a semi run on `buffer` (collected with ``collect_buffer``)."""
        return {"mode": "semi", "buffer": str(buffer), "steps": self.budget["updates"]}

    def collect_buffer(self, buffer: Path) -> None:
        m = self.base.model
        policy = Pipeline.of_section(m, Placement.of(self.base.hardware))
        collect(policy, self.collect, buffer, progress=False)


def run_regimes(cfg: RegimesRun, out: str | Path) -> dict:
    """The `experiment regimes` stage (AR-CoPO Table 2): on-policy, semi-on-policy and off-policy (semi
    without the clip) CoPO at equal budget (``EqualBudget``) from one base."""
    eb = EqualBudget.of(cfg)
    with output_folder(out, "experiment regimes") as tmp:
        eb.collect_buffer(tmp / "buffer")
        semi = eb.semi(tmp / "buffer")
        runs = [ObjectiveRun("on-policy", {}), ObjectiveRun("semi-on-policy", semi),
                ObjectiveRun("off-policy", {**semi, "clip": False})]  # fmt: skip
        return compare_runs(eb.base, runs, eb.texts, eb.reward, tmp, cfg.study.eval_seeds, "regimes",
                            "Training regimes at equal budget", extra={"budget": eb.budget})  # fmt: skip


def sweep_cells(st: SweepStudy) -> list[tuple[str, float, float, float]]:
    """Every (mode, lr, tau scale, clip eps) of the grid, in the order given."""
    return [(m, lr, t, e) for m in st.modes for lr in st.lrs for t in st.tau_scales for e in st.clip_epss]


def run_sweep(cfg: SweepRun, out: str | Path) -> dict:
    """The `experiment sweep` stage: CoPO for every cell of modes x lrs x tau scales x clip eps at equal
    budget (``EqualBudget``), each cell's adapter paired vs the base on fixed fresh seeds; ``sweep.md``
    (one row per cell: gain, OOD change, clip fraction, approx KL), ``sweep.json``, ``sweep.png``."""
    eb, cells = EqualBudget.of(cfg), sweep_cells(cfg.study)
    base = eb.base.replace(eval_every=0)  # no curves: the table is the result (and each cell costs less)
    with output_folder(out, "experiment sweep") as tmp:
        if "semi" in cfg.study.modes:
            eb.collect_buffer(tmp / "buffer")
        semi = eb.semi(tmp / "buffer")
        runs = [ObjectiveRun(f"{m}-lr{lr:g}-tau{t:g}-eps{e:g}",
                             {"lr": lr, "tau_scale": t, "clip_eps": e, **(semi if m == "semi" else {})})
                for m, lr, t, e in cells]  # fmt: skip
        grid = [{"mode": m, "lr": lr, "tau_scale": t, "clip_eps": e} for m, lr, t, e in cells]
        return compare_runs(base, runs, eb.texts, eb.reward, tmp, cfg.study.eval_seeds, "sweep",
                            "CoPO sweep: lr x tau scale x clip eps at equal budget",
                            extra={"budget": eb.budget, "grid": grid}, report=sweep_report)  # fmt: skip


def sweep_report(result: dict, out: Path, stem: str, title: str) -> None:
    """``<stem>.md`` (a row per cell), ``<stem>.json``, ``<stem>.png`` (composite gain vs clip fraction)."""
    ood = (result.get("ood_metrics") or ["composite"])[0]
    lines = [f"# {title} ({result['eval_pairs']} paired fresh videos per row)", "",
             "| mode | lr | tau scale | clip eps | clip frac | approx KL | composite | " + ood + " (OOD) | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    def cell(d: dict) -> str:
        return f"{d['diff']:+.4f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"

    for r, g in zip(result["runs"].values(), result["grid"], strict=True):
        clip = "-" if r["clip_frac"] is None else f"{r['clip_frac']:.3f}"
        kl = "-" if r["approx_kl"] is None else f"{r['approx_kl']:.3g}"
        vs = r["vs_base"]
        lines.append(f"| {g['mode']} | {g['lr']:g} | {g['tau_scale']:g} | {g['clip_eps']:g} | {clip} | {kl} | "
                     f"{cell(vs['composite'])} | {cell(vs[ood])} | {r['seconds']:.0f} |")  # fmt: skip
    lines += ["", "Cells: paired difference vs the base model with its 95% bootstrap interval; clip frac and approx "
              "KL (k3): means over the updates whose policy differs from its old policy.", ""]  # fmt: skip
    (out / f"{stem}.md").write_text("\n".join(lines))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    fig, ax = subplots(1, 1, figsize=(5.5, 3.8))
    for mode, marker in (("semi", "o"), ("on", "s")):
        pts = [(r["clip_frac"] or 0.0, r["vs_base"]["composite"]["diff"])
               for r, g in zip(result["runs"].values(), result["grid"], strict=True) if g["mode"] == mode]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=mode, alpha=0.8)
    ax.axhline(0, color="gray", lw=0.6)
    ax.set_xlabel("clip fraction (mean over moved updates)")
    ax.set_ylabel("composite gain vs base (fresh seeds)")
    ax.legend(fontsize=8)
    save(fig, out / f"{stem}.png", dpi=110)


CI = "{:+.3f} [{:+.3f}, {:+.3f}]"  # a paired difference and its 95% interval


def _ci(d: dict) -> list[float]:
    return [d["diff"], d["ci_low"], d["ci_high"]]


def noise_sources_table(rows: list[dict]) -> dict:
    """Per pivot: each source's pixel variance (and composite std), and initial / the largest solver variance."""
    sources = list(dict.fromkeys(r["source"] for r in rows))
    cell = {(r["pivot"], r["source"]): r for r in rows}
    out = []
    for p in sorted({r["pivot"] for r in rows}):
        var = {s: cell[p, s]["pixel_variance"] for s in sources}
        solver = max((v for s, v in var.items() if s != "initial"), default=None)
        out.append([p, *([var[s], cell[p, s]["composite_std"]] for s in sources),
                    var["initial"] / solver if solver else None])  # fmt: skip
    return table(["pivot", *sources, "initial / largest solver"],
                 ["{}", *["{:.2e} (std {:.3f})"] * len(sources), "{:.1f}x"], out)  # fmt: skip


def runs_table(result: dict) -> dict:
    """One row per run: training seconds, clip fraction, every paired difference vs the base with its interval."""
    keys = list(next(iter(result["runs"].values()))["vs_base"]) if result["runs"] else []
    rows = [[name, r["seconds"], r.get("clip_frac"), *(_ci(r["vs_base"][k]) for k in keys)]
            for name, r in result["runs"].items()]  # fmt: skip
    return table(["run", "training s", "clip frac", *keys], ["{}", "{:.0f}", "{:.2f}", *[CI] * len(keys)], rows)


def pairs_table(result: dict) -> dict:
    """One row per run after the first: its paired difference vs the first run on every metric."""
    runs = result["runs"]
    first = next(iter(runs), "")
    keys = list(next(iter(runs.values()))["vs_base"]) if runs else []
    rows = [[f"{name} - {first}", *(_ci(r["vs_first"][k]) for k in keys)] for name, r in runs.items()
            if "vs_first" in r]  # fmt: skip
    return table(["run", *keys], ["{}", *[CI] * len(keys)], rows)


def sweep_table(result: dict) -> dict:
    """One row per sweep cell: its grid point, clip fraction, approx KL, composite and OOD gains."""
    ood = (result.get("ood_metrics") or ["composite"])[0]
    rows = [[g["mode"], g["lr"], g["tau_scale"], g["clip_eps"], r["clip_frac"], r["approx_kl"],
             _ci(r["vs_base"]["composite"]), _ci(r["vs_base"][ood])]
            for r, g in zip(result["runs"].values(), result["grid"], strict=True)]  # fmt: skip
    return table(["mode", "lr", "tau scale", "clip eps", "clip frac", "approx KL", "composite", f"{ood} (OOD)"],
                 ["{}", "{:g}", "{:g}", "{:g}", "{:.3f}", "{:.3g}", CI, CI], rows)  # fmt: skip


def save_results(results: ResultsOut, tables: dict[str, dict], data: object) -> None:
    """``--json-out``: the stage's tables (and its whole result) as a results file, once the output is whole."""
    if results.json_out:
        write_results(results.json_out, provenance(), tables, data)


def noise_sources_stage(cfg: NoiseSourcesRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    rows = run_noise_sources(cfg, out)
    save_results(cfg.results, {"variance": noise_sources_table(rows)}, rows)
    return (Path(out) / "noise_sources.md").read_text()


def regimes_stage(cfg: RegimesRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    result = run_regimes(cfg, out)
    save_results(cfg.results, {"runs": runs_table(result)}, result)
    return (Path(out) / "regimes.md").read_text()


def sweep_stage(cfg: SweepRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    result = run_sweep(cfg, out)
    save_results(cfg.results, {"cells": sweep_table(result)}, result)
    return (Path(out) / "sweep.md").read_text()


def objectives_stage(cfg: ObjectivesRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    result = run_objectives(cfg, out)
    save_results(cfg.results, {"runs": runs_table(result), "pairs": pairs_table(result)}, result)
    return (Path(out) / "objectives.md").read_text()
