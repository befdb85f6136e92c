"""merge (exact LoRA sums, selection rule), evaluate (paired scoring, report files) and the quick demo."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from typer.testing import CliRunner

from streamalign.adapters.lora import LoraSettings, attach_lora, save_lora
from streamalign.adapters.merge import combine_adapters, save_merged_weights, select_scale
from streamalign.cli import app
from streamalign.evaluate.report import EvalSettings, ModelSpec, evaluate, spread
from streamalign.io.outputs import written_by
from streamalign.models.checkpoint import load_generator
from streamalign.pipeline import Pipeline
from streamalign.scoring import bootstrap_ci
from streamalign.worlds.shapes import SHIPPED_WEIGHTS
from streamalign.worlds.shapes.rewards import SHAPES_METRICS, SHAPES_REWARDS

TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


def random_adapter(folder, rank, alpha, seed, targets=TARGETS):
    """A peft adapter on the shipped shapes model with random A and B (a trained-looking delta)."""
    peft = attach_lora(load_generator("shapes", SHIPPED_WEIGHTS), LoraSettings(rank, alpha, targets), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return save_lora(peft, folder)


def reference_merge(parts):
    """W0 + sum s (alpha / r) B A, module by module, written out plainly."""
    from safetensors.torch import load_file

    model = load_generator("shapes", SHIPPED_WEIGHTS)
    want = {k: v.double().clone() for k, v in model.state_dict().items()}
    for folder, s in parts:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        sd = load_file(str(folder / "adapter_model.safetensors"))
        for k, a in sd.items():
            if ".lora_A." in k:
                b = sd[k.replace("lora_A", "lora_B")]
                name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                want[name] += s * cfg["lora_alpha"] / cfg["r"] * (b.double() @ a.double())
    return want


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    semi = random_adapter(d / "semi", 4, 8.0, 1)
    on = random_adapter(d / "on", 8, 4.0, 2, targets=("q", "v", "ffn.0"))  # other rank, alpha and targets
    return semi, on


def test_merge_is_exact_in_both_output_forms(tmp_path, adapters):
    semi, on = adapters
    parts = [(semi, 0.7), (on, 0.35)]
    want = reference_merge(parts)
    combined = combine_adapters(parts, tmp_path / "combined")
    via_adapter = Pipeline.load("shapes", lora=combined).model.state_dict()  # our loader merges the peft folder
    full = save_merged_weights("shapes", SHIPPED_WEIGHTS, parts, tmp_path / "merged.safetensors")
    via_weights = load_generator("shapes", full).state_dict()
    for k, w in want.items():
        assert torch.allclose(via_adapter[k].double(), w, atol=1e-6), k
        assert torch.allclose(via_weights[k].double(), w, atol=1e-6), k
    assert any(not torch.equal(via_weights[k], load_generator("shapes", SHIPPED_WEIGHTS).state_dict()[k]) for k in want)
    # the combined folder is a real peft adapter: PeftModel.from_pretrained on our model gives the same output
    peft = PeftModel.from_pretrained(load_generator("shapes", SHIPPED_WEIGHTS), str(combined)).eval()
    merged = load_generator("shapes", full)
    x, t = torch.randn(1, 3, 48, 8, 8), torch.full((1, 3), 500.0)
    ctx = torch.randn(1, 16, 384)
    with torch.no_grad():
        assert torch.allclose(peft(x, t, ctx), merged(x, t, ctx), atol=1e-5)


def test_peft_linear_combination_is_not_the_sum(adapters):
    """Why we concatenate: averaging A and B separately (peft 'linear') has cross terms."""
    from safetensors.torch import load_file

    semi, _ = adapters
    sd = load_file(str(semi / "adapter_model.safetensors"))
    k = next(k for k in sd if ".lora_A." in k)
    a, b = sd[k].double(), sd[k.replace("lora_A", "lora_B")].double()
    a2, b2 = a.flip(0), b.flip(1) * 0.5
    linear = (0.5 * b + 0.5 * b2) @ (0.5 * a + 0.5 * a2)
    assert not torch.allclose(linear, 0.5 * b @ a + 0.5 * b2 @ a2, atol=1e-6)


def test_selection_rule_on_a_synthetic_sweep():
    base = {"composite": 1.0, "background_cleanliness": 0.9}
    rows = {
        0.0: {"composite": 1.05, "background_cleanliness": 0.91},
        0.4: {"composite": 1.20, "background_cleanliness": 0.90},
        0.8: {"composite": 1.30, "background_cleanliness": 0.85},  # better reward, OOD drops: rejected
        1.0: {"composite": 0.95, "background_cleanliness": 0.95},  # OOD fine, reward worse: rejected
    }
    assert select_scale(rows, base).scale == 0.4
    assert select_scale(rows, base, ood_tolerance=0.06).scale == 0.8
    none = select_scale({1.0: rows[1.0], 0.8: rows[0.8]}, base)
    assert none.scale is None and "base model is kept" in none.reason


def test_bootstrap_interval_against_a_slow_loop():
    import random

    d = torch.randn(50, generator=torch.Generator().manual_seed(0)) + 0.3
    lo, hi = bootstrap_ci(d, n_boot=4000, seed=1)
    rng = random.Random(2)
    means = sorted(sum(rng.choice(d.tolist()) for _ in range(50)) / 50 for _ in range(4000))
    assert lo < float(d.mean()) < hi
    assert abs(lo - means[100]) < 0.03 and abs(hi - means[3899]) < 0.03


def test_evaluate_pairs_the_noise_and_writes_the_report(tmp_path, adapters):
    semi, _ = adapters
    prompts = spread(["a red circle moving left on a black background", "a blue square moving up on a gray background",
                      "a cyan square moving down on a navy background"], 3)  # fmt: skip
    st = EvalSettings(rewards=SHAPES_REWARDS, metrics=SHAPES_METRICS, seeds_per_prompt=2, samples=2, n_boot=200)
    models = [ModelSpec("base"), ModelSpec("same"), ModelSpec("lora", lora=str(semi))]
    r = evaluate(models, prompts, st, tmp_path / "rep")
    same = r["models"]["same"]["vs_base"]
    assert all(v["diff"] == 0.0 and v["ci_low"] == 0.0 for v in same.values())  # identical noise: paired exactly
    assert r["models"]["lora"]["vs_base"]["composite"]["diff"] != 0.0
    assert set(r["models"]["lora"]["per_prompt"]) == set(prompts) and r["pairs"] == 6
    for f in ("report.md", "report.json", "diffs.png", "samples/grid-0.png", "samples/lora-1.gif"):
        assert (tmp_path / "rep" / f).stat().st_size > 100, f
    assert "background_cleanliness (OOD)" in (tmp_path / "rep" / "report.md").read_text()


def test_cli_errors_are_one_line(tmp_path, adapters):
    _, on = adapters
    runner = CliRunner()
    r = runner.invoke(app, ["merge", "--on", str(on), "--out", str(tmp_path / "m"), "--scales", "0,a"])
    assert r.exit_code == 2 and "--scales" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["merge", "--on", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["merge", "--on", str(on), "--out", str(tmp_path / "m"), "--ood-metric", "sharpnes"])
    assert r.exit_code == 2 and "--ood-metric" in r.output
    assert not (tmp_path / "m").exists()  # nothing half-written
    r = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "e"), "--prompt-set", "held-outt"])
    assert r.exit_code == 2 and "--prompt-set" in r.output


def test_demo_quick_runs_every_stage_and_writes_the_report(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "held-out prompts" in r.output and "report:" in r.output
    d = tmp_path / "demo"
    h = json.loads((d / "demo.json").read_text())
    assert set(h["stage_seconds"]) == {"collect", "train semi", "train on", "merge sweep", "evaluate"}
    # the default run's evidence that training aligns (the longer runs are in test_train_gain.py, slow):
    # the sweep selects a trained scale, and on held-out prompts and fresh seeds (paired with the base's
    # noise) the composite rises and background cleanliness rises with a paired interval above 0
    assert h["selected_scale"] > 0 and h["evaluated"] != "base"
    assert h["held_out_composite"]["diff"] > 0.05, h["held_out_composite"]
    assert h["held_out_background_cleanliness"]["ci_low"] > 0, h["held_out_background_cleanliness"]
    for f in ("merge/sweep.md", "merge/sweep.png", "report/report.md", "report/diffs.png", "report/samples/grid-0.png"):
        assert (d / f).is_file(), f
    kinds = {".": "demo", "buffer": "collect", "semi": "train", "on": "train", "on/rollouts": "collect",
             "merge": "merge", "report": "evaluate"}  # every output folder names the command that wrote it
    assert {k: written_by(d / k) for k in kinds} == kinds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporaries left beside it


def edited_adapter(src, dst, config=None, rename=None):
    """A copy of adapter folder `src` with config entries replaced and weight keys renamed."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    sd = load_file(str(src / "adapter_model.safetensors"))
    sd = {(rename(k) if rename else k): v for k, v in sd.items()}
    save_file(sd, str(dst / "adapter_model.safetensors"))
    return dst


def test_merge_refuses_config_rank_disagreeing_with_weights(tmp_path, adapters):
    semi, on = adapters
    bad = edited_adapter(semi, tmp_path / "bad-rank", config={"r": 8})  # weights have rank 4
    with pytest.raises(ValueError) as err:
        combine_adapters([(bad, 1.0), (on, 0.5)], tmp_path / "out")
    msg = str(err.value)
    assert f"adapter {bad}" in msg and "r=8" in msg and "rank 4" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
    r = CliRunner().invoke(app, ["merge", "--semi", str(bad), "--on", str(on), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "r=8" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "m").exists()


def test_merge_refuses_modules_foreign_to_the_generator(tmp_path, adapters):
    semi, on = adapters
    foreign = edited_adapter(on, tmp_path / "foreign", rename=lambda k: k.replace(".q.lora_", ".q_proj.lora_"))
    with pytest.raises(ValueError, match=rf"adapter {foreign} does not belong to this generator: .*q_proj"):
        combine_adapters([(semi, 1.0), (foreign, 0.5)], tmp_path / "out", "shapes")
    r = CliRunner().invoke(app, ["merge", "--semi", str(semi), "--on", str(foreign), "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "q_proj" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    # without a model: a module two adapters share must have one shape (here: A of another width)
    from safetensors.torch import load_file, save_file

    wide = edited_adapter(on, tmp_path / "wide")
    sd = load_file(str(wide / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith(".q.lora_A.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    save_file(sd, str(wide / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"adapter {wide}: module .* but {semi} has it"):
        combine_adapters([(semi, 1.0), (wide, 0.5)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rank_pattern_is_checked_and_merge_refuses_per_module_patterns(tmp_path, adapters):
    from streamalign.models.checkpoint import read_adapter

    semi, _ = adapters
    wrong = edited_adapter(semi, tmp_path / "wrong", config={"rank_pattern": {"q": 2}})  # q's weights: rank 4
    with pytest.raises(ValueError, match=r"r=2 but its weights have rank 4 \(.*\.q\.lora_A"):
        read_adapter(wrong)
    matching = edited_adapter(semi, tmp_path / "matching", config={"rank_pattern": {"q": 4}})
    assert read_adapter(matching)[0]["rank_pattern"] == {"q": 4}
    with pytest.raises(ValueError, match=rf"adapter {matching}: per-module rank_pattern"):
        combine_adapters([(matching, 1.0)], tmp_path / "out")
