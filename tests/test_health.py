"""Run health (train/health.py): synthetic runs — exploding ratios warn with cause and fix, a healthy run
does not — the trend interval against a slow reference, readable curves, and `streamalign report`."""

from __future__ import annotations

import json
import math
import random

import pytest
import yaml
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.train.health import health, running_mean, spans_decades, trend

CONFIG = {"optim": {"lr": 1e-4, "grad_clip": 1.0, "batch_groups": 8}, "objective": {"name": "copo", "clip_eps": 1e-4}}


def rows(n=40, exploding=False, seed=0):
    rng = random.Random(seed)
    out = []
    for step in range(1, n + 1):
        first = step == 1
        r = {"step": step, "reward": 0.5 + 0.004 * step + rng.gauss(0, 0.01),
             "loss": (rng.uniform(1e4, 3e6) if exploding and not first else rng.gauss(0, 0.01)),
             "clip_frac": 0.0 if first else (rng.uniform(0.98, 0.999) if exploding else rng.uniform(0.02, 0.15)),
             "grad_norm": (rng.uniform(1e5, 7e7) if exploding and not first else rng.uniform(0.05, 0.5)),
             "ratio_dev_max": (rng.uniform(1e5, 1.6e8) if exploding and not first else rng.uniform(1e-3, 0.05)),
             "zero_variance_groups": 0.0}  # fmt: skip
        out.append(r)
        if step % 10 == 0:
            out.append({"step": step, "eval_composite": 0.5 + 0.003 * step, "eval_composite_ci_low": 0.48,
                        "eval_composite_ci_high": 0.56 + 0.003 * step})  # fmt: skip
    return out


def test_exploding_ratios_warn_with_cause_and_fix():
    h = health(rows(exploding=True), CONFIG)
    text = " ".join(w["what"] + " " + w["cause"] + " " + w["fix"] for w in h["warnings"])
    assert "clip fraction 0.99 (median) after the first update" in text
    assert "try --lr 1e-05 or --tau-scale 10" in text and "--clip-eps 0.0001" in text
    assert "x --grad-clip" in text and "ratio deviation up to" in text


def test_a_healthy_run_has_no_warning():
    h = health(rows(), CONFIG)
    assert h["warnings"] == [] and h["updates"] == 40
    t = h["reward"]["trend"]
    assert t["ci_low"] > 0  # the reward rises, and the interval says so
    assert h["clip_frac"]["max"] < 0.2 and h["eval"]["change"] == pytest.approx(0.09)


def test_zero_variance_and_falling_reward_warn():
    r = rows()
    for x in r:
        if "reward" in x:
            x["reward"] = 1.0 - 0.01 * x["step"]
            x["zero_variance_groups"] = 4.0
    text = " ".join(w["what"] for w in health(r, CONFIG)["warnings"])
    assert "50% of groups have no reward variance" in text and "training reward fell by" in text


def test_trend_against_a_slow_reference():
    ys = [math.sin(i) + 0.1 * i for i in range(30)]
    t = trend(ys)
    a, b = ys[:10], ys[-10:]
    ma, mb = sum(a) / 10, sum(b) / 10
    va = sum((x - ma) ** 2 for x in a) / 9
    vb = sum((x - mb) ** 2 for x in b) / 9
    assert t["diff"] == pytest.approx(mb - ma)
    assert t["ci_high"] - t["diff"] == pytest.approx(1.96 * math.sqrt(va / 10 + vb / 10))
    assert trend([1.0] * 5) is None
    assert running_mean([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert spans_decades([1e-3, 1.0, 50.0]) and not spans_decades([0.1, 5.0]) and not spans_decades([-1, 1e3])


def test_report_command_writes_health_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(exploding=True)))
    (run / "run.yaml").write_text(yaml.safe_dump({"streamalign": {"stage": "train"}, "config": CONFIG}))
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 0, r.output
    assert "# Run health" in r.output and "clip fraction" in r.output and "try --lr 1e-05" in r.output
    for f in ("health.md", "health.json", "health.png"):
        assert (run / f).stat().st_size > 100, f
    r = CliRunner().invoke(app, ["report", str(run), "--json"])
    assert json.loads(r.output)["updates"] == 40
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.1}\n{"step": 2, "lo\n')
    r = CliRunner().invoke(app, ["report", str(run)])
    assert r.exit_code == 2 and "metrics.jsonl, line 2: not a JSON row" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "has no metrics.jsonl" in r.output
