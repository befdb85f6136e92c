"""Crash matrix (slow): `collect` and `train` killed with SIGKILL at several moments, then re-run, give
byte-identical results to an uninterrupted run, and a killed run never leaves visible partial output
(every visible shard or checkpoint is complete). Run with ``pytest -m slow tests/test_crash_matrix.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamalign.buffer.collection import LOCK
from streamalign.buffer.inspect import verify_buffer
from streamalign.buffer.manifest import MANIFEST_DIR, read_manifest
from streamalign.io.files import checksum
from streamalign.train.state import CHECKPOINTS, checkpoints, read_checkpoint

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
COLLECT = ["collect", "--groups", "5", "-G", "2", "--entries-per-shard", "1", "--seed", "3"]
TRAIN = ["train", "--steps", "5", "--batch-groups", "2", "--lr", "1e-4", "--lora-rank", "4", "--lora-alpha", "8",
         "--threads", "1", "--save-every", "1"]  # fmt: skip


def cli(*args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "streamalign.cli", "-q", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*args: str) -> None:
    p = cli(*args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-2000:]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (fails if it exits first)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "kill point never reached"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def shard_sums(folder: Path) -> dict[str, str]:
    return {p.name: checksum(p) for p in sorted(folder.glob("shard-*"))}


def parts(folder: Path) -> int:
    return len(list((folder / MANIFEST_DIR).glob("*.parquet")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "buf"
    finish(*COLLECT, "--out", str(out))
    return out


# kill points: the record written (inside the first group), after 1 and after 3 finished shards
@pytest.mark.parametrize("after", [0, 1, 3])
def test_collect_killed_then_resumed_equals_uninterrupted(tmp_path, reference, after):
    out = tmp_path / "buf"
    proc = cli(*COLLECT, "--out", str(out))
    kill_when(proc, lambda: (out / MANIFEST_DIR / "collection.json").exists() and parts(out) >= after)
    ref = shard_sums(reference)
    visible = shard_sums(out)
    assert all(ref[name] == digest for name, digest in visible.items())  # no visible partial shard
    assert not verify_buffer(out).ok  # interrupted: reported (INCOMPLETE or a shard without its part)
    finish(*COLLECT, "--out", str(out))  # takes over the dead run's lock, cleans its temporaries
    assert shard_sums(out) == ref and len(ref) == 5
    assert sorted(read_manifest(out).to_pylist(), key=str) == sorted(read_manifest(reference).to_pylist(), key=str)
    assert verify_buffer(out).ok and not list(out.rglob(".*tmp-*")) and not (out / LOCK).exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reference) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    finish(*TRAIN, "--buffer", str(reference), "--out", str(out))
    return out


def _rows(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "step_time_s"} for x in (out / "metrics.jsonl").open()]


# kill points: once the first checkpoint is there, and once the third is (while the first is pruned)
@pytest.mark.parametrize("after", [1, 3])
def test_train_killed_then_resumed_equals_uninterrupted(tmp_path, reference, trained, after):
    out = tmp_path / "run"
    proc = cli(*TRAIN, "--buffer", str(reference), "--out", str(out))
    kill_when(proc, lambda: (out / CHECKPOINTS / f"step-{after:07d}").exists())
    assert not (out / "adapter").exists()  # no final adapter before the end
    for c in checkpoints(out):  # every visible checkpoint is complete and verifies
        read_checkpoint(c)
    finish(*TRAIN, "--buffer", str(reference), "--out", str(out), "--resume")
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (trained / adapter).read_bytes()
    assert _rows(out) == _rows(trained)
    assert not list((out / CHECKPOINTS).glob(".*"))  # no staged leftovers


# staged writers: a killed re-run never touches the previous output, and a finished re-run equals it
PROMPTS_FILE_LINES = ["a red circle moving left on a black background", "a blue square moving up on a gray background"]
STAGED = {
    "evaluate": (["evaluate", "--seeds", "2", "--samples", "2"], ("report.json",)),
    "generate": (["generate", "--seed", "5"], ("generate.json", "0000.mp4", "0001.mp4")),
    "merge": (["merge", "--scales", "0,1", "--seeds", "1"], ("sweep.json", "adapter/adapter_model.safetensors")),
}


def _staged_args(name: str, tmp_path: Path, trained: Path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS_FILE_LINES))
    args, _ = STAGED[name]
    if name == "generate":
        return [*args, "--prompts", str(prompts)]
    if name == "merge":
        return [*args, "--on", str(trained / "adapter"), "--prompts", str(prompts)]
    return [*args, "--prompts", str(prompts), "--lora", str(trained / "adapter")]


def _sums(out: Path, files) -> dict[str, str]:
    return {f: checksum(out / f) for f in files}


@pytest.mark.parametrize("name", list(STAGED))
@pytest.mark.parametrize("moment", ["started", "writing"])
def test_staged_outputs_survive_a_killed_rerun(tmp_path, trained, name, moment):
    out = tmp_path / "out"
    args = [*_staged_args(name, tmp_path, trained), "--out", str(out)]
    finish(*args)
    files = STAGED[name][1]
    before = _sums(out, files)
    proc = cli(*args)

    def ready() -> bool:
        tmp = [p for p in tmp_path.glob(".out.tmp-*") if p.is_dir()]
        return bool(tmp) and (moment == "started" or any(f.is_file() for f in tmp[0].rglob("*")))

    kill_when(proc, ready)
    assert _sums(out, files) == before  # the previous output is whole, never mixed with the killed run's
    finish(*args)  # the dead run's temporaries are removed, the output replaced in one step
    assert _sums(out, files) == before  # deterministic: the same bytes
    assert not list(tmp_path.glob(".out.*"))
