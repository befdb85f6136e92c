"""`streamalign experiment`: the AR-CoPO analyses, runnable on any model.

- ``noise-sources`` (AR-CoPO Fig. 6): how much the finished video varies when ONLY the pivot chunk's
  initial noise changes vs when only ONE of its solver (re-noising) noises changes, per pivot position.
- ``objectives`` (AR-CoPO Fig. 2 / Table 2): copo, copo without the clip (off-policy), nft and sde-grpo
  trained on-policy with the same prompts, seeds and budget; reward curves on fixed fresh seeds, the OOD
  metric, and each final adapter's paired difference vs the base.
- ``regimes`` (AR-CoPO Table 2): on-policy vs semi-on-policy vs off-policy (semi without the clip) CoPO at
  equal budget (rollout groups and updates), paired in-domain and OOD differences vs the base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..collect.collector import CollectConfig, collect
from ..io.outputs import output_folder
from ..io.plots import save, subplots
from ..models.placement import Placement
from ..pipeline import Pipeline
from ..rewards import CompositeReward
from ..rewards.sources import reward_of
from ..schemas.config import ModelConfig
from ..scoring import paired_differences, score_policy
from ..train.config import TrainConfig
from ..train.loop import train
from ..worlds import default_prompts, default_rewards
from .config import NoiseSourcesRun, ObjectivesRun, RegimesRun
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
    policy = Pipeline.load(m.config, m.checkpoint, m.lora, m.lora_alpha, m.wan_dir, Placement.of(cfg.hardware))
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
) -> dict:  # fmt: skip
    """Train each run (`base` with its overrides) into ``tmp/<name>``, score its adapter paired vs the base
    model on fixed fresh seeds, write ``<stem>.md/json/png`` into `tmp`; returns the result."""
    ps = [p for p in prompts for _ in range(eval_seeds)]
    seeds = [4_000_000 + i for i in range(len(ps))]
    m, place = base.model, Placement.of(base.hardware)
    base_scores = score_policy(ModelSpec("base").load(m.config, m.checkpoint, m.wan_dir, place), ps, seeds, reward)
    result: dict = {"prompts": list(prompts), "eval_pairs": len(ps), **(extra or {}),
                    "ood_metrics": [r.label for r in reward.metrics], "runs": {}}  # fmt: skip
    for r in runs:
        cfg = base.replace(**r.overrides, eval_prompts=tuple(ps))  # validated
        summary = train(cfg, tmp / r.name, progress=progress)
        spec = ModelSpec(r.name, lora=str(summary.adapter))
        sc = score_policy(spec.load(m.config, m.checkpoint, m.wan_dir, place), ps, seeds, reward)
        rows = [json.loads(x) for x in (tmp / r.name / "metrics.jsonl").read_text().splitlines()]
        clip = [row["clip_frac"] for row in rows if "clip_frac" in row][1:]  # after the first update
        result["runs"][r.name] = {
            "seconds": round(summary.seconds, 1),
            "updates": summary.steps,
            "clip_frac": sum(clip) / len(clip) if clip else None,
            "vs_base": paired_differences(base_scores, sc),
            "curve": [{k: v for k, v in row.items() if k == "step" or k.startswith("eval_")}
                      for row in rows if "eval_composite" in row],
        }
    runs_report(result, tmp, stem, title)
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


def run_regimes(cfg: RegimesRun, out: str | Path) -> dict:
    """The `experiment regimes` stage (AR-CoPO Table 2): on-policy, semi-on-policy and off-policy (semi
    without the clip) CoPO at equal budget from one base. Budget: I iterations x B groups of rollouts and
    I x K updates of B groups for every regime — on-policy rolls out B fresh groups per iteration and
    updates K times on them; the semi regimes train I x K updates on a buffer of the same I x B groups
    collected once from the base (so each group is also used K times)."""
    m, st = cfg.model, cfg.study
    model = ModelConfig.load(m.config)
    texts = tuple(spread(list(default_prompts(model, cfg.prompts.prompts, cfg.prompts.prompt_set)), st.n_prompts))
    rewards, metrics = default_rewards(model, cfg.rewards.rewards, cfg.rewards.metrics)
    reward = reward_of(cfg.rewards, rewards, metrics)  # checked before any model loads
    sources = cfg.rewards.model_dump(exclude={"rewards", "metrics"})
    base = TrainConfig(mode="on", model=m, prompts=texts, steps=st.iterations, batch_groups=st.batch_groups,
                       group_size=st.group_size, updates_per_iter=st.updates_per_iter, lr=st.lr,
                       eval_every=st.eval_every, seed=st.seed, save_every=10**6, rewards=rewards, metrics=metrics,
                       hardware=cfg.hardware.model_dump(), **sources)  # fmt: skip
    groups, updates = st.iterations * st.batch_groups, st.iterations * st.updates_per_iter
    with output_folder(out, "experiment regimes") as tmp:
        ccfg = CollectConfig(prompts=texts, groups=groups, group_size=st.group_size, seed=st.seed,
                             rewards=rewards, metrics=metrics, **sources)  # fmt: skip
        policy = Pipeline.load(m.config, m.checkpoint, wan_dir=m.wan_dir, placement=Placement.of(cfg.hardware))
        collect(policy, ccfg, tmp / "buffer", progress=False)
        semi = {"mode": "semi", "buffer": str(tmp / "buffer"), "steps": updates}
        runs = [ObjectiveRun("on-policy", {}), ObjectiveRun("semi-on-policy", semi),
                ObjectiveRun("off-policy", {**semi, "clip": False})]  # fmt: skip
        budget = {"rollout_groups": groups, "updates": updates, "groups_per_update": st.batch_groups}
        return compare_runs(base, runs, texts, reward, tmp, st.eval_seeds, "regimes",
                            "Training regimes at equal budget", extra={"budget": budget})  # fmt: skip


def noise_sources_stage(cfg: NoiseSourcesRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    run_noise_sources(cfg, out)
    return (Path(out) / "noise_sources.md").read_text()


def regimes_stage(cfg: RegimesRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    run_regimes(cfg, out)
    return (Path(out) / "regimes.md").read_text()


def objectives_stage(cfg: ObjectivesRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    run_objectives(cfg, out)
    return (Path(out) / "objectives.md").read_text()
