"""`streamalign experiment`: noise sources and the equal-budget objective comparison, at toy sizes."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.io.outputs import written_by
from streamalign.io.results import render_table


def test_noise_sources_table_and_plot(tmp_path):
    out = tmp_path / "ns"
    results = tmp_path / "results" / "ns.json"
    r = CliRunner().invoke(app, ["experiment", "noise-sources", "--out", str(out), "--n-prompts", "1", "--seeds", "1",
                                 "-G", "3", "--json-out", str(results)])  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "noise_sources.json").read_text())
    # --json-out: the same rows as data, and the docs' table (variance, std, initial / largest solver) from them
    doc = json.loads(results.read_text())
    assert doc["data"] == rows and doc["meta"]["command"].startswith("streamalign") and "version" in doc["meta"]
    table = doc["tables"]["variance"]
    assert table["columns"] == ["pivot", "initial", "solver 1", "solver 2", "solver 3", "initial / largest solver"]
    for row in table["rows"]:
        mine = {x["source"]: x for x in rows if x["pivot"] == row[0]}
        assert row[1] == [mine["initial"]["pixel_variance"], mine["initial"]["composite_std"]]
        largest = max(mine[f"solver {k}"]["pixel_variance"] for k in (1, 2, 3))
        assert row[-1] == pytest.approx(mine["initial"]["pixel_variance"] / largest)
    assert "| 0 | " in render_table(doc, "variance", "results/ns.json")
    assert {(x["pivot"], x["source"]) for x in rows} == {
        (p, s) for p in range(4) for s in ("initial", "solver 1", "solver 2", "solver 3")
    }
    assert all(x["pixel_variance"] > 0 for x in rows)  # every source moves the output a little
    assert (out / "noise_sources.png").stat().st_size > 1000 and "| pivot |" in r.output
    assert written_by(out) == "experiment noise-sources"


@pytest.mark.slow
def test_objectives_comparison_runs_every_objective(tmp_path):
    out = tmp_path / "obj"
    args = ["experiment", "objectives", "--out", str(out), "--iterations", "1", "--n-prompts", "2", "--eval-seeds",
            "1", "--batch-groups", "2", "-G", "3", "--eval-every", "1"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "objectives.json").read_text())
    assert set(res["runs"]) == {"copo", "copo-offpolicy", "nft", "sde-grpo", "sde-grpo-eps0.2"}
    clips = {n: yaml.safe_load((out / n / "run.yaml").read_text())["config"]["objective"]["clip_eps"]
             for n in ("sde-grpo", "sde-grpo-eps0.2")}  # fmt: skip
    assert clips == {"sde-grpo": 1e-4, "sde-grpo-eps0.2": 0.2}
    assert all(run["curve"] and "composite" in run["vs_base"] for run in res["runs"].values())
    # every later run paired vs the first on the same videos: the mean of the differences is the difference
    # of the two runs' means (each one's vs_base "model")
    runs = res["runs"]
    assert "vs_first" not in runs["copo"]
    for name in ("nft", "sde-grpo"):
        d = runs[name]["vs_first"]["composite"]
        assert d["diff"] == pytest.approx(runs[name]["vs_base"]["composite"]["model"]
                                          - runs["copo"]["vs_base"]["composite"]["model"], abs=1e-9)  # fmt: skip
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    # sde-grpo collected solver forks: its rollouts share the pivot's initial noise within a group
    assert (out / "sde-grpo" / "rollouts").is_dir() and (out / "objectives.png").is_file()
    r = CliRunner().invoke(app, ["experiment", "objectives", "--out", str(tmp_path / "x"), "--runs", "ppo"])
    assert r.exit_code == 2 and "unknown objective runs" in r.output


@pytest.mark.slow
def test_regimes_run_at_equal_budget(tmp_path):
    out = tmp_path / "reg"
    args = ["experiment", "regimes", "--out", str(out), "--iterations", "1", "--n-prompts", "2", "--eval-seeds",
            "1", "--batch-groups", "2", "-G", "3", "--eval-every", "1", "--updates-per-iter", "2",
            "--json-out", str(tmp_path / "regimes.json")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "regimes.json").read_text())
    runs = json.loads((tmp_path / "regimes.json").read_text())["tables"]["runs"]
    assert [row[0] for row in runs["rows"]] == list(res["runs"]) and runs["columns"][3:] == list(
        res["runs"]["on-policy"]["vs_base"]
    )
    first = runs["columns"][3]  # each cell: the paired difference and its interval, as in regimes.json
    want = [[r["vs_base"][first][k] for k in ("diff", "ci_low", "ci_high")] for r in res["runs"].values()]
    assert [row[3] for row in runs["rows"]] == want
    assert set(res["runs"]) == {"on-policy", "semi-on-policy", "off-policy"}
    assert res["budget"] == {"rollout_groups": 2, "updates": 2, "groups_per_update": 2}
    assert all(run["updates"] == 2 and "composite" in run["vs_base"] for run in res["runs"].values())
    assert res["runs"]["off-policy"]["clip_frac"] == 0.0  # off-policy: the surrogate without the clip
    assert (out / "buffer" / "manifest").is_dir() and (out / "regimes.png").is_file()
    assert "| semi-on-policy | 2 |" in (out / "regimes.md").read_text()


@pytest.mark.slow
def test_sweep_runs_every_cell_at_equal_budget(tmp_path):
    """2 modes x 1 lr x 1 tau scale x 2 clip eps at a toy budget (~1 min)."""
    out = tmp_path / "sw"
    args = ["experiment", "sweep", "--out", str(out), "--iterations", "1", "--n-prompts", "2", "--eval-seeds", "1",
            "--batch-groups", "2", "-G", "3", "--lrs", "1e-4", "--tau-scales", "1",
            "--clip-epss", "1e-4,0.01", "--json-out", str(tmp_path / "sweep.json")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "sweep.json").read_text())
    cells = json.loads((tmp_path / "sweep.json").read_text())["tables"]["cells"]["rows"]
    assert [(c[0], c[3]) for c in cells] == [(g["mode"], g["clip_eps"]) for g in res["grid"]]
    assert [c[6][0] for c in cells] == [run["vs_base"]["composite"]["diff"] for run in res["runs"].values()]
    assert [(g["mode"], g["clip_eps"]) for g in res["grid"]] == [("semi", 1e-4), ("semi", 0.01), ("on", 1e-4),
                                                                  ("on", 0.01)]  # fmt: skip
    assert res["budget"] == {"rollout_groups": 2, "updates": 2, "groups_per_update": 2}
    for (name, run), g in zip(res["runs"].items(), res["grid"], strict=True):
        assert run["updates"] == 2 and "composite" in run["vs_base"], name
        assert 0 <= run["clip_frac"] <= 1 and run["approx_kl"] >= 0, name
        cfg = yaml.safe_load((out / name / "run.yaml").read_text())["config"]  # each cell trains with its own cell
        assert (cfg["mode"], cfg["objective"]["clip_eps"], cfg["optim"]["lr"]) == (g["mode"], g["clip_eps"], 1e-4)
    assert (out / "sweep.png").stat().st_size > 1000 and "| semi | 0.0001 | 1 | 0.01 |" in r.output
    assert written_by(out) == "experiment sweep"


def test_json_out_is_a_file_name(tmp_path):
    r = CliRunner().invoke(app, ["experiment", "noise-sources", "--out", str(tmp_path / "ns"), "--json-out",
                                 str(tmp_path)])  # fmt: skip
    assert r.exit_code == 2 and "--json-out" in r.output and "is a folder" in r.output
    assert not (tmp_path / "ns").exists()
