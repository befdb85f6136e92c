"""train on the shapes config: exact resume, 2-process torchrun equal to 1 process, on-policy rollouts
tagged by policy version, peft-format adapters, clear errors. The base is a random-weight shapes-shape
generator (saved to disk): its fork branches differ a lot, so the objective has real signal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from streamalign.buffer.manifest import read_manifest
from streamalign.cli import app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.models.checkpoint import load_generator, save_safetensors
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train.config import TrainConfig
from streamalign.train.loop import train
from streamalign.worlds.shapes import held_in_prompts
from tests.conftest import free_port, make_model

PROMPTS = tuple(p.text for p in held_in_prompts()[::50])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "random-shapes.safetensors"
    save_safetensors(make_model(ModelConfig.load("shapes"), seed=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def buffer(tmp_path_factory, base) -> Path:
    out = tmp_path_factory.mktemp("buf")
    cfg = CollectConfig(prompts=PROMPTS, groups=4, group_size=4, entries_per_shard=2, seed=5)
    collect(Pipeline.load("shapes", base), cfg, out, progress=False)
    return out


def _cfg(base, buffer, **kw) -> TrainConfig:
    args = dict(buffer=str(buffer), checkpoint=str(base), steps=4, batch_groups=2, lr=1e-4, lora_rank=4,
                lora_alpha=8, save_every=2, threads=1)  # fmt: skip
    return TrainConfig(**{**args, **kw})


def _rows(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "step_time_s"} for line in (out / "metrics.jsonl").open()
    ]


def test_semi_resume_equals_uninterrupted_bitwise(tmp_path, base, buffer):
    full = train(_cfg(base, buffer), tmp_path / "full", progress=False)
    assert full.steps == 4 and (tmp_path / "full" / "curves.png").exists()
    rows = _rows(tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[0]["tau"] > 1e-6
    assert rows[0]["ratio_dev_max"] < 1e-5  # first update: the policy equals the reference
    train(_cfg(base, buffer, steps=2), tmp_path / "part", progress=False)  # "interrupted" after 2 updates
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n")  # a row written after the last checkpoint
    train(_cfg(base, buffer), tmp_path / "part", resume=True, progress=False)
    a = (tmp_path / "full" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "part" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    assert _rows(tmp_path / "part") == rows
    before = load_file(
        str(tmp_path / "full" / "checkpoints" / "step-0000002" / "adapter" / "adapter_model.safetensors")
    )
    after = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    assert any((before[k] - after[k]).abs().max() > 0 for k in after)  # it trained


@pytest.mark.parametrize("objective", ["nft", "sde-grpo"])
def test_other_objectives_train_and_resume_bitwise(tmp_path, base, buffer, objective):
    """Same buffer, same loop: NFT (with its old / reference copies and kappa checkpointed) and SDE-GRPO."""
    kw = {"objective": objective, "kl_w": 1.0} if objective == "nft" else {"objective": objective}
    train(_cfg(base, buffer, **kw), tmp_path / "full", progress=False)
    rows = _rows(tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if objective == "nft":
        assert [r["old_decay"] for r in rows] == [0.0, 0.001, 0.002, 0.003]  # d = min(0.001 step, 0.5)
        assert all(0.02 <= r["kappa"] <= 0.2 for r in rows) and all(r["kl_mask_rate"] > 0 for r in rows)
    else:
        assert rows[0]["ratio_dev_max"] < 1e-4  # policy == old at the first update
    train(_cfg(base, buffer, steps=2, **kw), tmp_path / "part", progress=False)
    train(_cfg(base, buffer, **kw), tmp_path / "part", resume=True, progress=False)
    for f in (
        "adapter/adapter_model.safetensors",
        *(["checkpoints/step-0000004/objective.safetensors"] if objective == "nft" else []),
    ):
        assert (tmp_path / "full" / f).read_bytes() == (tmp_path / "part" / f).read_bytes(), f
    assert _rows(tmp_path / "part") == rows


def test_bf16_autocast_trains_close_to_fp32(tmp_path, base, buffer):
    """--autocast bf16 (on CUDA by default; forced here on the CPU): the forward runs in bf16, the LoRA
    weights and AdamW stay fp32; 'auto' on a CPU is exactly fp32."""
    fp32 = train(_cfg(base, buffer, steps=2, autocast="off"), tmp_path / "fp32", progress=False)
    auto = train(_cfg(base, buffer, steps=2), tmp_path / "auto", progress=False)
    bf16 = train(_cfg(base, buffer, steps=2, autocast="bf16"), tmp_path / "bf16", progress=False)
    a, b, c = (load_file(str(r.adapter / "adapter_model.safetensors")) for r in (fp32, auto, bf16))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(c[k].dtype == torch.float32 for k in c)
    rows_a, rows_c = _rows(tmp_path / "fp32"), _rows(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows_c)
    assert rows_a[0]["tau"] != rows_c[0]["tau"] or rows_a[0]["loss"] != rows_c[0]["loss"]  # really ran in bf16
    assert abs(rows_a[0]["reward"] - rows_c[0]["reward"]) < 1e-6  # same data


def test_adapter_is_peft_format_and_merges_exactly(tmp_path, base, buffer):
    from peft import PeftModel

    train(_cfg(base, buffer, steps=2, lr=1e-2), tmp_path / "run", progress=False)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    peft = PeftModel.from_pretrained(load_generator("shapes", base), str(adapter))
    merged = load_generator("shapes", base, lora=adapter)
    x = torch.randn(1, 3, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((1, 3), 937.5)
    ctx = torch.randn(1, 16, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = load_generator("shapes", base)(x, t, ctx)
        a, b = peft.base_model.model(x, t, ctx), merged(x, t, ctx)
    assert (a - b).abs().max() < 1e-5 and (a - plain).abs().max() > 1e-4


def test_on_policy_collects_tagged_rollouts_then_updates(tmp_path, base):
    cfg = TrainConfig(mode="on", checkpoint=str(base), prompts=PROMPTS, steps=2, batch_groups=2, group_size=3,
                      updates_per_iter=2, lr=1e-4, lora_rank=4, lora_alpha=8, save_every=1, threads=1)  # fmt: skip
    s = train(cfg, tmp_path, progress=False)
    assert s.steps == 4
    rows = read_manifest(tmp_path / "rollouts").to_pylist()
    tags = sorted({r["policy_id"].split("+")[1] for r in rows})
    assert tags == ["it00000", "it00001"] and len(rows) == 2 * 2 * 3
    first = _rows(tmp_path)
    assert first[0]["ratio_dev_max"] < 1e-4  # old = the rollout policy: rho = 1 at the first update
    assert first[1]["ratio_dev_max"] > first[0]["ratio_dev_max"]  # the second update moved away from it


def test_torchrun_two_processes_equal_one(tmp_path, base, buffer):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--buffer", str(buffer), "--checkpoint", str(base), "--steps", "2", "--batch-groups", "4",
            "--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "streamalign.cli", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    two = subprocess.run([*cmd, "-m", "streamalign.cli", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    # same global batch; only the order of float sums differs, which Adam's normalisation can amplify on
    # near-zero gradient entries: parameters agree to within 5% of one Adam step (lr 1e-3)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 0.05 * 1e-3, worst
    ra, rb = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert ra[0]["loss"] == pytest.approx(rb[0]["loss"], rel=1e-5, abs=1e-9)  # same parameters: sum order only
    # update 2 starts from the parameters above (up to 5% of a step apart); CoPO's per-step temperature
    # (late steps get a smaller tau than the pooled median) makes the loss more sensitive to that
    assert ra[1]["loss"] == pytest.approx(rb[1]["loss"], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--lr", "5"], "--lr 5.0 is out of range (0, 1]"),
        (["--mode", "on", "-G", "1"], "--group-size 1 must lie in 2..256"),
        (["--buffer", "/nope"], "buffer /nope does not exist"),
        (["--config", "OTHER"], "holds groups of model config ['shapes']"),
        (["--init-adapter", "ADAPTER"], "that do not fit"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, base, buffer, extra, msg):
    if "ADAPTER" in extra:  # an adapter trained on another model (rank-2 LoRA on the tiny config)
        from streamalign.adapters.lora import LoraSettings, attach_lora, save_lora

        save_lora(attach_lora(make_model(ModelConfig.load("tiny")), LoraSettings(2, 4)), tmp_path / "other")
        extra = ["--init-adapter", str(tmp_path / "other"), "--checkpoint", str(base)]
    elif "--config" in extra:  # a 2-layer variant of the shapes config
        import yaml

        data = ModelConfig.load("shapes").model_dump(mode="json")
        data["name"], data["arch"]["num_layers"] = "shapes-2l", 2
        (tmp_path / "other.yaml").write_text(yaml.safe_dump(data))
        other = ModelConfig.load(tmp_path / "other.yaml")
        save_safetensors(make_model(other).state_dict(), tmp_path / "t.safetensors")
        extra = ["--config", str(tmp_path / "other.yaml"), "--checkpoint", str(tmp_path / "t.safetensors")]
    args = ["train", "--out", str(tmp_path / "x"), "--buffer", str(buffer), "--steps", "1", *extra]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(base)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and msg in r.output, r.output
    assert not (tmp_path / "x" / "adapter").exists()


def test_empty_buffer_is_refused(tmp_path, base):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "--buffer", str(tmp_path / "empty"),
                                 "--checkpoint", str(base)])  # fmt: skip
    assert r.exit_code == 2 and r.output.startswith("error: "), r.output
    assert "empty" in r.output or "no manifest" in r.output or "no entries" in r.output, r.output
