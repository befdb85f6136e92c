"""Run health: what a training run's ``metrics.jsonl`` says about it, as numbers, warnings with cause and
fix, and readable curves (``streamalign report RUN``; a ``health`` section in ``summary.json``).

Read from the logged rows (one per update; evaluation rows carry ``eval_*``):
- reward trend: mean training reward of the last third of updates minus the first third, with a normal
  95% interval (Welch: sqrt(var1/n1 + var2/n2)), and the evaluation composite's first -> last change;
- trust region: clip fraction and approx KL (k3) of the updates whose policy differs from the old one
  (``ratio_dev_max`` > 0; without it, every update after the first: the first has ratio 1 by construction,
  and so has each on-policy iteration's first), the 99th percentile of |log rho|, ratio deviation, and the
  ``--target-kl`` early stops;
- signal: zero-variance groups (identical rewards in a group give zero advantages) per update;
- gradients: pre-clip norm median / max vs ``--grad-clip``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..io.files import write_atomic
from ..io.outputs import MARKER, written_by
from ..io.plots import save, subplots
from ..schemas.run import RUN_FILE, RunConfig, arg, read_run_file
from .metrics import read_metrics
from .objectives.base import LOG_RATIO_MAX

HEALTH_FILES = ("health.md", "health.json", "health.png")
CLIP_HIGH = 0.5  # median clip fraction above which the clip no longer acts as a trust region
GRAD_HIGH = 100.0  # median pre-clip gradient norm above this multiple of --grad-clip: explosion
ZERO_VAR_HIGH = 0.25  # share of groups without reward variance above which the signal is thin
RATIO_HIGH = 1e3  # largest |ratio - 1| above which the log-ratios are out of any trust region
KL_HIGH = 0.1  # approx KL per update above which a run has left its reference (absent a --target-kl)
LOG_RATIO_NEAR = 10.0  # a 99th percentile of |log rho| above this is within e^10 of the clamp
STOPS_HIGH = 0.5  # share of iterations stopped early by --target-kl above which it, not K, sets the budget


@dataclass(frozen=True)
class Finding:
    """A health finding: what was measured, its likely cause, and what to change."""

    what: str
    cause: str
    fix: str

    def line(self) -> str:
        return f"{self.what} — {self.cause}; {self.fix}"


def _finite(rows: Sequence[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "mean": statistics.fmean(values), "max": max(values),
            "min": min(values), "last": values[-1]}  # fmt: skip


def trend(values: Sequence[float]) -> dict[str, float] | None:
    """Mean of the last third minus the first third and its 95% interval (None below 6 values)."""
    n = len(values) // 3
    if n < 2:
        return None
    a, b = values[:n], values[-n:]
    diff = statistics.fmean(b) - statistics.fmean(a)
    half = 1.96 * math.sqrt(statistics.variance(a) / n + statistics.variance(b) / n)
    return {"first": statistics.fmean(a), "last": statistics.fmean(b), "diff": diff, "ci_low": diff - half,
            "ci_high": diff + half, "n": n}  # fmt: skip


TRUST_KEYS = ("clip_frac", "approx_kl", "log_ratio_p99")  # summarised over the updates that moved


def moved_rows(rows: Sequence[dict]) -> list[dict]:
    """The updates whose policy differs from their old policy: ``ratio_dev_max`` > 0 where logged, else
    every update after the first."""
    if any("ratio_dev_max" in r for r in rows):
        return [r for r in rows if isinstance(r.get("ratio_dev_max"), (int, float)) and r["ratio_dev_max"] > 0]
    first = min((r["step"] for r in rows), default=0)
    return [r for r in rows if r["step"] > first]


def health(rows: Sequence[dict], config: dict | None = None) -> dict:
    """The health summary of a run's metric rows (``config``: its resolved run config, for lr, clip eps,
    grad clip, batch groups and target KL). Keys: ``updates``, ``reward``, ``eval``, ``clip_frac``,
    ``approx_kl``, ``ratio_dev_max``, ``zero_variance_share``, ``grad_norm``, ``warnings``."""
    cfg = config or {}
    optim, objective = cfg.get("optim", {}), cfg.get("objective", {})
    train_rows = [r for r in rows if "loss" in r]
    out: dict = {"updates": len(train_rows)}
    rewards = [v for _, v in _finite(train_rows, "reward")]
    out["reward"] = {**(_summary(rewards) if rewards else {}), "trend": trend(rewards)}
    evals = _finite(rows, "eval_composite")
    if evals:
        lo, hi = _finite(rows, "eval_composite_ci_low"), _finite(rows, "eval_composite_ci_high")
        out["eval"] = {"steps": [s for s, _ in evals], "composite": [v for _, v in evals],
                       "ci_low": [v for _, v in lo], "ci_high": [v for _, v in hi],
                       "change": evals[-1][1] - evals[0][1]}  # fmt: skip
    moved = moved_rows(train_rows)
    for key in ("clip_frac", "approx_kl", "log_ratio_p99", "ratio_dev_max", "grad_norm", "adv_std"):
        vals = [v for _, v in _finite(moved if key in TRUST_KEYS else train_rows, key)]
        if vals:
            out[key] = _summary(vals)
    stops = [r for r in train_rows if r.get("kl_stop")]
    k = cfg.get("rollouts", {}).get("updates_per_iter") if cfg.get("mode") == "on" else None
    if stops or objective.get("target_kl"):
        out["kl_stops"] = len(stops)
        if k:  # the step counter keeps iteration x K through early stops
            out["iterations"] = len({(r["step"] - 1) // k for r in train_rows})
    groups = optim.get("batch_groups")
    zero = [v for _, v in _finite(train_rows, "zero_variance_groups")]
    if zero and groups:
        out["zero_variance_share"] = sum(zero) / (len(zero) * groups)
    out["non_finite"] = sum(1 for r in train_rows for k in ("loss", "reward", "grad_norm")
                            if isinstance(r.get(k), float) and not math.isfinite(r[k]))  # fmt: skip
    out["warnings"] = [asdict(w) for w in warnings(out, optim, objective)]
    return out


def warnings(h: dict, optim: dict, objective: dict) -> list[Finding]:
    """The findings of a health summary, most serious first."""
    found = []
    lr, clip = optim.get("lr"), optim.get("grad_clip", 1.0)
    if h.get("non_finite"):
        found.append(Finding(f"{h['non_finite']} non-finite loss/reward/gradient values",
                              "a diverged update or a reward that returned NaN/inf",
                              "check the reward on the logged steps; lower --lr"))  # fmt: skip
    cf = h.get("clip_frac")
    if cf and cf["median"] >= CLIP_HIGH:
        lower = f"--lr {lr / 10:g}" if lr else "lr/10"
        found.append(Finding(
            f"clip fraction {cf['median']:.2f} (median) after the first update",  # of the updates that moved
            f"the policy moves further in one update than the ratio clip (--clip-eps {objective.get('clip_eps', '?')}) "
            "allows: the update is the gradient clip applied to the few most extreme ratios (lr too high for "
            "--clip-eps, or a temperature too small for the branches' spread)",
            f"try {lower} or --tau-scale 10"))  # fmt: skip
    g = h.get("grad_norm")
    if g and g["median"] > GRAD_HIGH * clip:
        found.append(Finding(
            f"pre-clip gradient norm {g['median']:.3g} (median), {g['median'] / clip:.0f}x --grad-clip",
            "every update is rescaled by the norm clip, so its size no longer depends on the loss",
            "lower --lr, or raise --tau-scale so log-ratios stay small"))  # fmt: skip
    r = h.get("ratio_dev_max")
    if r and r["max"] > RATIO_HIGH:
        found.append(Finding(f"ratio deviation up to {r['max']:.3g}",
                              "importance ratios far outside the trust region (log-ratios of tens)",
                              "raise --tau-scale or lower --lr"))  # fmt: skip
    kl = h.get("approx_kl")
    target = objective.get("target_kl") or KL_HIGH
    if kl and kl["median"] > target:
        found.append(Finding(f"approx KL {kl['median']:.3g} per update (median, k3 estimator) above {target:g}",
                              "the policy leaves the rollout policy faster than the objective assumes",
                              "lower --lr or set --target-kl to stop an iteration's remaining updates"))  # fmt: skip
    q = h.get("log_ratio_p99")
    if q and q["median"] >= LOG_RATIO_NEAR:
        found.append(Finding(f"|log ratio| 99th percentile {q['median']:.3g} (median)",
                              f"log-ratios reach the numerical bound ±{LOG_RATIO_MAX:g}, where they are clamped "
                              "and give no gradient", "lower --lr or raise --tau-scale"))  # fmt: skip
    stops, iterations = h.get("kl_stops", 0), h.get("iterations", 0)
    if stops and iterations and stops > STOPS_HIGH * iterations:
        found.append(Finding(f"--target-kl {objective.get('target_kl')} stopped {stops} iterations early",
                              "most iterations use fewer updates than --updates-per-iter",
                              "lower --lr (a smaller step per update) or raise --target-kl"))  # fmt: skip
    z = h.get("zero_variance_share")
    if z is not None and z > ZERO_VAR_HIGH:
        found.append(Finding(f"{z:.0%} of groups have no reward variance",
                              "identical rewards across a group's branches give zero advantages: no signal",
                              "raise --sigma or -G, or use rewards that separate the branches"))  # fmt: skip
    t = (h.get("reward") or {}).get("trend")
    if t and t["ci_high"] < 0:
        found.append(Finding(f"training reward fell by {-t['diff']:.3g} (95% interval [{t['ci_low']:.3g}, "
                              f"{t['ci_high']:.3g}])", "the updates move the policy against the reward",
                              "check the sign of the rewards' weights; lower --lr"))  # fmt: skip
    return found


def markdown(h: dict, run: str | Path) -> str:
    """The report as Markdown: numbers, then warnings (or that there are none)."""
    lines = [f"# Run health: {run}", "", f"- updates: {h['updates']}"]
    t = (h.get("reward") or {}).get("trend")
    if t:
        lines.append(f"- training reward: {t['first']:.4f} (first third) -> {t['last']:.4f} (last third), change "
                     f"{t['diff']:+.4f} [95%: {t['ci_low']:+.4f}, {t['ci_high']:+.4f}]")  # fmt: skip
    if "eval" in h:
        e = h["eval"]
        lines.append(f"- evaluation composite: {e['composite'][0]:.4f} -> {e['composite'][-1]:.4f} "
                     f"({e['change']:+.4f}) over {len(e['steps'])} evaluations")  # fmt: skip
    for key, label in (("clip_frac", "clip fraction (after update 1)"), ("approx_kl", "approx KL"),
                       ("ratio_dev_max", "ratio deviation, max"), ("grad_norm", "pre-clip gradient norm"),
                       ("log_ratio_p99", "|log ratio| p99"), ("adv_std", "advantage std")):  # fmt: skip
        if key in h:
            s = h[key]
            lines.append(f"- {label}: median {s['median']:.3g}, max {s['max']:.3g}, last {s['last']:.3g}")
    if "zero_variance_share" in h:
        lines.append(f"- zero-variance groups: {h['zero_variance_share']:.1%}")
    if "kl_stops" in h:
        lines.append(f"- --target-kl early stops: {h['kl_stops']}" + (f" of {h['iterations']} iterations"
                                                                     if "iterations" in h else ""))  # fmt: skip
    lines += ["", "## Warnings", ""]
    lines += [f"- {Finding(**w).line()}" for w in h["warnings"]] or ["- none: the run looks healthy."]
    return "\n".join(lines) + "\n"


def running_mean(ys: Sequence[float], window: int) -> list[float]:
    """Trailing mean over `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def spans_decades(ys: Sequence[float]) -> bool:
    """Positive values whose range covers more than two decades: shown on a log axis."""
    pos = [y for y in ys if y > 0]
    return len(pos) == len(ys) and len(pos) > 1 and max(pos) / min(pos) > 100


LABELS = {"reward": "training reward (mean of groups)", "eval_composite": "evaluation composite",
          "loss": "loss", "clip_frac": "clip fraction", "approx_kl": "approx KL (k3)",
          "grad_norm": "grad norm (pre-clip)",
          "ratio_dev_max": "max |ratio - 1|", "log_ratio_p99": "|log ratio| p99", "tau": "temperature tau"}  # fmt: skip


def plot_rows(rows: Sequence[dict], png: Path, keys: Sequence[str]) -> Path | None:
    """One labelled panel per key that has values: raw values and a running mean (training keys), the
    evaluation composite with its 95% interval; log axes where values span decades."""
    present = [k for k in keys if _finite(rows, k)]
    if not present:
        return None
    cols = min(3, len(present))
    nrow = math.ceil(len(present) / cols)
    fig, axes = subplots(nrow, cols, figsize=(3.8 * cols, 2.9 * nrow), squeeze=False)
    for ax, k in zip([a for row in axes for a in row], present, strict=False):
        pts = _finite(rows, k)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if k.startswith("eval"):
            ax.plot(xs, ys, "o-", lw=1.2, label="mean")
            lo, hi = _finite(rows, f"{k}_ci_low"), _finite(rows, f"{k}_ci_high")
            if len(lo) == len(xs) == len(hi):
                ax.fill_between(xs, [v for _, v in lo], [v for _, v in hi], alpha=0.25, label="95% interval")
        else:
            ax.plot(xs, ys, lw=0.8, alpha=0.45, label="per update")
            if len(ys) > 5:
                ax.plot(xs, running_mean(ys, max(2, len(ys) // 10)), lw=1.6, label="running mean")
        if spans_decades(ys):
            ax.set_yscale("log")
        elif k == "loss" and ys and max(abs(y) for y in ys) > 100 * (statistics.median(abs(y) for y in ys) or 1):
            ax.set_yscale("symlog", linthresh=max(1e-6, statistics.median(abs(y) for y in ys)))
        ax.set_xlabel("update")
        ax.set_ylabel(LABELS.get(k, k))
        ax.legend(fontsize=7)
    for ax in [a for row in axes for a in row][len(present) :]:
        ax.set_visible(False)
    return save(fig, png)


CURVE_KEYS = ("loss", "reward", "eval_composite", "grad_norm", "clip_frac", "approx_kl")  # curves.png
HEALTH_KEYS = ("reward", "eval_composite", "clip_frac", "approx_kl", "grad_norm", "loss", "ratio_dev_max",
               "log_ratio_p99", "tau")


class ReportRun(RunConfig):
    """Health of a training run from its metrics.jsonl: reward trend with an interval, clip fraction, KL,
    zero-variance groups, gradient norms, and warnings with cause and fix (health.md/json/png in RUN)."""

    run: str = arg(..., "Run folder (written by `streamalign train`).", argument=True)
    json_out: bool = arg(False, "Print the summary as JSON instead of Markdown.", flag="--json")


def report_run(run: str | Path) -> tuple[dict, str]:
    """Read ``RUN/metrics.jsonl`` (+ ``run.yaml``), write ``health.md/json/png`` into RUN; (summary, md)."""
    run = Path(run)
    jsonl = run / "metrics.jsonl"
    if not jsonl.is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl: give a run folder written by `streamalign train`")
    if written_by(run) is None:  # health.* are written only into a folder of streamalign's
        raise FileExistsError(f"{run} holds files that no streamalign command wrote (no {MARKER}): give a run "
                              "folder written by `streamalign train`")  # fmt: skip
    rows = read_metrics(jsonl)
    if not rows:
        raise ValueError(f"{jsonl} is empty: the run logged no update yet")
    config = read_run_file(run / RUN_FILE) if (run / RUN_FILE).is_file() else None
    h = health(rows, config)
    text = markdown(h, run)
    write_atomic(run / "health.json", json.dumps(h, indent=1))
    write_atomic(run / "health.md", text)
    plot_rows(rows, run / "health.png", HEALTH_KEYS)  # io.plots.save writes atomically
    return h, text


def report_stage(cfg: ReportRun) -> str:
    h, text = report_run(cfg.run)
    return json.dumps(h, indent=1) if cfg.json_out else text.rstrip()
