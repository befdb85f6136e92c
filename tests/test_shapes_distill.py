"""Stage 3 of the shapes recipe: the DDIM teacher path, the self-distillation stage and the shipped
``shapes-distilled`` preset (its provenance and the noise-source ratio it was shipped for)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from streamalign.models.noise import ExplicitNoise
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.worlds.shapes import SHIPPED_WEIGHTS
from streamalign.worlds.shapes.distill import DISTILLED_NAME, DistillConfig, distill

ASSETS = SHIPPED_WEIGHTS.parent
DISTILLED = ASSETS / DISTILLED_NAME


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ode_path_is_the_ddim_recursion_and_ignores_solver_noise():
    world = Pipeline.load("shapes")
    s = world.sampler
    text = world.text.encode(["a red circle moving left on a gray background"])
    init = torch.randn(1, 3, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    solvers = [torch.randn(1, 3, 1, 3, 48, 8, 8, generator=torch.Generator().manual_seed(k)) for k in (1, 2)]
    outs = []
    for solver in solvers:
        noise = ExplicitNoise(init, solver.expand(1, 3, 1, 3, 48, 8, 8), 3)
        outs.append(s.denoise_chunk(s.new_cache(1, 1), 0, noise, text, ode=True).x0)
    assert torch.equal(outs[0], outs[1])
    # slow obvious reference: x0 = f(x, t_i); eps = (x - (1 - s_i) x0) / s_i; x = (1 - s_{i+1}) x0 + s_{i+1} eps
    x, cache = init.clone(), s.new_cache(1, 1)
    sig, ts = s.schedule.sigmas, s.schedule.timesteps
    for i in range(len(sig)):
        x0 = s.predict_x0(x, ts[i], sig[i], text, cache, 0)
        if i + 1 < len(sig):
            x = (1 - sig[i + 1]) * x0 + sig[i + 1] * ((x - (1 - sig[i]) * x0) / sig[i])
    torch.testing.assert_close(outs[0], x0, rtol=0, atol=1e-6)
    # the stochastic path (the default) does depend on the solver noise
    sto = [s.denoise_chunk(s.new_cache(1, 1), 0, ExplicitNoise(init, sv, 3), text).x0 for sv in solvers]
    assert not torch.equal(sto[0], sto[1])


def test_distill_stage_is_deterministic_and_records_provenance(tmp_path):
    cfg = DistillConfig(pool=3, steps=2, batch_size=2, eval_every=2, eval_videos=2, warmup=1, threads=1)
    a = distill(cfg, tmp_path / "a", command="test", progress=False)
    distill(cfg, tmp_path / "b", command="test", progress=False)
    wa, wb = (tmp_path / d / DISTILLED_NAME for d in "ab")
    assert wa.read_bytes() == wb.read_bytes() != SHIPPED_WEIGHTS.read_bytes()
    assert a["init_sha256"] == _sha(SHIPPED_WEIGHTS) and a["weights_sha256"] == _sha(wa)
    assert yaml.safe_load((tmp_path / "a" / "distill.yaml").read_text())["weights_sha256"] == _sha(wa)
    rows = [json.loads(x) for x in (tmp_path / "a" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "colour_rate" in rows[-1]
    # the student loads strictly into the shapes arch
    Pipeline.from_weights("shapes", wa)
    with pytest.raises(FileNotFoundError, match="--init"):
        distill(cfg.model_copy(update={"init": str(tmp_path / "missing.safetensors")}), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_shipped_distilled_preset_and_its_recipe():
    """Stage 3 starts from the shipped shapes weights and its output is the preset's checkpoint."""
    assert DISTILLED.stat().st_size <= 10 * 2**20
    recipe = yaml.safe_load((ASSETS / "distill.yaml").read_text())
    stage2 = yaml.safe_load((ASSETS / "pretrain.yaml").read_text())
    assert recipe["command"].startswith("streamalign shapes distill")
    assert recipe["init_sha256"] == stage2["weights_sha256"] == _sha(SHIPPED_WEIGHTS)
    assert recipe["weights_sha256"] == _sha(DISTILLED)
    assert recipe["wall_time_s"] <= 30 * 60
    steps = recipe["distill_config"]["steps"]
    assert len((ASSETS / "distill-curve.jsonl").read_text().splitlines()) == steps
    assert (ASSETS / "distill-curve.png").stat().st_size > 10_000
    cfg = ModelConfig.load("shapes-distilled")
    assert cfg.arch == ModelConfig.load("shapes").arch and cfg.checkpoint == str(DISTILLED)
    world = Pipeline.load("shapes-distilled")  # strict load
    p = ["a blue square moving up on a black background"] * 2
    a = world.generate(p, [3, 4])
    assert torch.equal(a, world.generate(p, [3, 4])) and a.shape == (2, 12, 3, 32, 32)


def test_shipped_noise_source_table_is_complete():
    """The table measured on the shipped weights (`experiment noise-sources -c shapes-distilled`, defaults)
    covers every pivot and source; its ratios are reported in the README (the 10x target is not met)."""
    rows = json.loads((ASSETS / "distill-noise-sources.json").read_text())
    cfg = ModelConfig.load("shapes-distilled")
    steps = len(cfg.sampler.denoising_steps)
    assert {(r["pivot"], r["source"]) for r in rows} == {
        (p, s) for p in range(cfg.num_chunks) for s in ["initial"] + [f"solver {k}" for k in range(1, steps)]
    }
    assert all(r["groups"] == 16 and r["pixel_variance"] > 0 for r in rows)
    md = (ASSETS / "distill-noise-sources.md").read_text()
    assert all(f"{r['pixel_variance']:.2e}" in md for r in rows)
