"""VBench export (layout, names, paired seeds, the scoring script) and merge's OOD criterion from VBench
results files."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.evaluate.vbench import file_name, prompt_lists, read_results, results_metric
from streamalign.io.media import read_mp4
from streamalign.pipeline import Pipeline
from tests.test_merge_evaluate import random_adapter

PROMPTS = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]


def test_prompt_lists_and_file_names(tmp_path):
    (tmp_path / "dims").mkdir()
    (tmp_path / "dims" / "color.txt").write_text("a red car\n\na blue bird\n")
    (tmp_path / "dims" / "scene.txt").write_text("a beach\n")
    assert prompt_lists(tmp_path / "dims", []) == {"color": ["a red car", "a blue bird"], "scene": ["a beach"]}
    assert prompt_lists(None, ["x"]) == {"custom": ["x"]}
    assert file_name("A 3D model of a 1800s victorian house.", 3) == "A 3D model of a 1800s victorian house.-3.mp4"
    assert file_name("up/down", 0) == "up_down-0.mp4"
    with pytest.raises(FileNotFoundError, match="--vbench-prompts"):
        prompt_lists(tmp_path / "none.txt", [])


def test_results_are_read_per_row(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "x_eval_results.json").write_text(json.dumps({"dynamic_degree": [0.4, [{"v": 1}]]}))
    (tmp_path / "s0.5_eval_results.json").write_text(json.dumps({"dynamic_degree": [0.6, []], "color": [0.1, []]}))
    assert read_results(tmp_path / "s0.5_eval_results.json") == {"dynamic_degree": 0.6, "color": 0.1}
    assert results_metric(tmp_path, "base", "vbench:dynamic_degree") == 0.4
    assert results_metric(tmp_path, "s0.5", "vbench:color") == 0.1
    with pytest.raises(ValueError, match=r"no VBench 'scene' score for 's0\.5'"):
        results_metric(tmp_path, "s0.5", "vbench:scene")


def test_evaluate_exports_vbench_layout_with_paired_seeds(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "color.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "vb"
    r = CliRunner().invoke(app, ["evaluate", "--out", str(tmp_path / "ev"), "--seeds", "1", "--samples", "1",
                                 "--prompts", str(lists / "color.txt"), "--export-vbench", str(out),
                                 "--vbench-prompts", str(lists), "--vbench-samples", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    videos = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    assert videos == sorted(f"base/color/{p}-{i}.mp4" for p in PROMPTS for i in range(2))
    record = json.loads((out / "export.json").read_text())
    assert record["models"] == ["base"] and record["seed"] == 2
    assert "vbench evaluate --videos_path" in (out / "vbench.sh").read_text() and "--dimension $d" in (
        out / "vbench.sh"
    ).read_text()
    # video j of the list uses seed 2 + j: the second prompt's index-1 video is seed 5
    want = Pipeline.load("shapes").generate([PROMPTS[1]], [5])[0]
    got = read_mp4(out / "base" / "color" / f"{PROMPTS[1]}-1.mp4")
    assert got.shape[0] == want.shape[0]
    small = torch.nn.functional.interpolate(got.float(), size=want.shape[-2:], mode="area")
    assert (small - want).abs().mean() < 0.05  # the same video (through MP4 compression and upscaling)


def test_merge_takes_its_ood_criterion_from_vbench_results(tmp_path):
    on = random_adapter(tmp_path / "on", 4, 8.0, 2)
    res = tmp_path / "res"
    res.mkdir()
    for row, score in (("base", 0.50), ("s0", 0.50), ("s1", 0.40)):
        (res / f"{row}_eval_results.json").write_text(json.dumps({"dynamic_degree": [score, []]}))
    args = ["merge", "--on", str(on), "--scales", "0,1", "--seeds", "1", "--prompts", str(_file(tmp_path)),
            "--ood-metric", "vbench:dynamic_degree", "--out", str(tmp_path / "m")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "needs --ood-results" in r.output
    r = CliRunner().invoke(app, [*args, "--ood-results", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no VBench 'dynamic_degree' score for 'base'" in r.output, r.output
    r = CliRunner().invoke(app, [*args, "--ood-results", str(res)])
    assert r.exit_code == 0, r.output
    sweep = json.loads((tmp_path / "m" / "sweep.json").read_text())
    assert sweep["base"]["vbench:dynamic_degree"] == 0.5
    assert sweep["rows"]["1"]["means"]["vbench:dynamic_degree"] == 0.4
    assert sweep["selected_scale"] != 1.0  # s_on = 1 lowers the VBench OOD score: never selected


def _file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(PROMPTS))
    return f
