"""bench/gpu_check.py --dry-run: the GPU owner's check runs its whole path (rollouts, memory, one train update)
on the CPU at tiny width."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_every_check_and_writes_json(tmp_path, capsys):
    """Every check but ``compile`` (its inductor compile takes a minute on the CPU: the slow test below)."""
    gpu_check = load_gpu_check()
    names = ["drift", "attention", "speed", "memory", "train"]
    report = gpu_check.main(["--dry-run", "--checks", ",".join(names), "--out", str(tmp_path / "check.json")])
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(capsys.readouterr().out)
    checks = report["checks"]
    assert list(checks) == names and list(gpu_check.CHECKS) == ["drift", "attention", "speed", "compile", *names[3:]]
    drift = checks["drift"]
    assert 0 < drift["rel_l2"] < 0.2 and len(drift["rel_l2_per_chunk"]) == 4  # bf16 rounding, not garbage
    assert checks["attention"] == {"skipped": "flash-attn is not installed", "check_seconds": pytest.approx(0, abs=1)}
    speed = checks["speed"]
    assert len(speed["seconds_per_chunk"]) == 4 and speed["frames_per_second"] > 0 and speed["flops"] > 0
    assert speed["pixel_frames"] == 45  # 12 latent frames through the VAE's 4x temporal factor
    memory = checks["memory"]
    # the plan (fake tensors, depth extrapolated) predicts the real tensors' peak exactly on the CPU
    assert memory["ratio"] == 1.0 and memory["measured"] == memory["predicted"] > 0
    train = checks["train"]  # one CoPO update (4 anchors x 4 steps in one replay batch): the plan's peak exactly
    assert train["ratio"] == 1.0 and train["measured"] == train["predicted"] > 0 and train["replay_batch"] == 16
    assert train["seconds_per_update"] > 0 and train["flops"] > 0 and train["objective"] == "copo"
    assert train["optimizer_bytes"] > 0  # the steady state's moments, in the measured and the planned peak
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--checks", "speed,nope"])


@pytest.mark.slow
def test_dry_run_compile_check_reports_frames_per_second_with_and_without():
    """``compile``: the bf16 rollout eager and compiled; one graph per region (batch 1 only); the compiled
    bf16 latents near eager's (bf16: fused kernels keep float32 between the ops eager rounds to bf16)."""
    c = load_gpu_check().main(["--dry-run", "--checks", "compile"])["checks"]["compile"]
    assert c["eager_frames_per_second"] > 0 and c["compiled_frames_per_second"] > 0
    assert c["speedup"] == pytest.approx(c["compiled_frames_per_second"] / c["eager_frames_per_second"])
    assert c["graphs"] == {"qkv": 1, "kv": 1, "rest": 1} and c["compile_seconds"] > 0
    assert len(c["compiled_seconds_per_chunk"]) == 4 and 0 < c["vs_eager"]["rel_l2"] < 0.02


def test_dry_run_train_ratio_sees_a_plan_without_the_optimizer_state(monkeypatch):
    """The dry run's tracker counts the optimizer state the warm-up update left: a plan of the first update
    (no moments held) comes out short by them, and the ratio says so."""
    from streamalign.train import memory

    gpu_check = load_gpu_check()
    steady = gpu_check.main(["--dry-run", "--checks", "train"])["checks"]["train"]
    first_update = memory.train_update_memory
    monkeypatch.setattr(memory, "train_update_memory", lambda *a, **k: first_update(*a, **k, steady=False))
    first = gpu_check.main(["--dry-run", "--checks", "train"])["checks"]["train"]
    assert steady["ratio"] == 1.0 and first["measured"] == steady["measured"]
    assert first["predicted"] == steady["predicted"] - steady["optimizer_bytes"] and first["ratio"] > 1
