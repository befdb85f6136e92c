"""The declared version floors are true: bench/floor_check.sh installs torch, transformers, diffusers and
peft at the lowest versions pyproject.toml admits into a fresh venv and runs the model, checkpoint,
text-encoder, codec, reward-model and FSDP tests there (needs the package index, ~6 GB of disk, ~10 min)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_floor_versions_pass_the_model_reward_codec_and_fsdp_tests(tmp_path):
    out = tmp_path / "floor_check.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "floor_check.sh"), str(tmp_path / "venv")],
        # the caller's environment (package index settings, certificates) with the project venv's Python
        env={**os.environ, "PYTHON": sys.executable, "FLOOR_CHECK_RESULTS": str(out)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {m[1]: m[2] for d in deps if (m := re.match(r"^(torch|transformers|diffusers|peft)>=([\d.]+)", d))}
    assert {k: record["installed"][k] for k in floors} == floors  # the floors themselves were installed
    assert record["pytest_exit"] == 0 and "failed" not in record["pytest_summary"]
