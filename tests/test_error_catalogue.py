"""The error catalogue: every bad input and failure the README promises to report as one line is driven
through the CLI and must exit 2 with exactly one line on stderr (``error: ...``, no traceback, no ANSI
codes, no Python reprs) and leave nothing new on disk. Checks that come before any model loads are run
with model construction forbidden. A full disk is simulated in-process (fsync raising ENOSPC, as it does
on a full disk with delayed allocation); ``test_real_full_and_read_only_disks`` (slow) mounts a tiny and
a read-only tmpfs in a user namespace where the system allows one."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.io import files
from streamalign.io.outputs import MARKER
from streamalign.models import wan
from streamalign.schemas.config import ModelConfig

SHAPES = str(ModelConfig.load("shapes").checkpoint)
PROMPT = "a red circle moving left on a black background"
TRAIN_ON = ["--mode", "on", "--steps", "1", "--batch-groups", "1", "-G", "2", "--lora-rank", "2", "--threads", "1"]


BAR = re.compile(r"\d+%\|")  # a progress bar's line (a library's first model load draws one), not an error


def listing(root: Path) -> dict[str, int]:
    """Every path under `root` (hidden ones included) with its size (folders: -1)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in root.rglob("*")}


def fails(root: Path, args: list[str], *expect: str) -> str:
    """Run the CLI; it must exit 2 with one `error:` line holding every `expect`, and leave `root` as it was."""
    before = listing(root)
    r = CliRunner().invoke(app, args)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not BAR.search(line)]
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    msg = lines[0]
    assert "Traceback" not in r.output and "\x1b" not in msg and "PosixPath" not in msg, msg
    for e in expect:
        assert e in msg, msg
    assert listing(root) == before, msg
    return msg


@pytest.fixture
def no_model(monkeypatch):
    """Building a generator fails the test: the check under test must come before any model loads."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the input check")

    monkeypatch.setattr(wan.CausalWanModel, "__init__", built)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


OUT_COMMANDS = {
    "collect": ["collect"],
    "train": ["train", "--mode", "on"],
    "evaluate": ["evaluate"],
    "merge": ["merge", "--on", "adapter"],
    "demo": ["demo", "--quick"],
    "generate": ["generate", PROMPT],
    "shapes pretrain": ["shapes", "pretrain"],
    "shapes distill": ["shapes", "distill"],
    "experiment noise-sources": ["experiment", "noise-sources"],
    "experiment objectives": ["experiment", "objectives"],
    "experiment regimes": ["experiment", "regimes"],
    "experiment sweep": ["experiment", "sweep"],
}


def test_every_command_with_out_is_listed():
    """OUT_COMMANDS covers every command that takes --out (the STAGES table and train / generate)."""
    import typer

    def walk(group, prefix: str = "") -> list[str]:
        found, ctx = [], typer.Context(group)
        for name in group.list_commands(ctx):
            cmd = group.get_command(ctx, name)
            if hasattr(cmd, "list_commands"):  # a group
                found += walk(cmd, f"{prefix}{name} ")
            elif any("--out" in p.opts for p in cmd.params):
                found.append(prefix + name)
                assert any("--overwrite" in p.opts for p in cmd.params), name
        return found

    assert sorted(walk(typer.main.get_command(app))) == sorted(OUT_COMMANDS)


@pytest.mark.parametrize("command", list(OUT_COMMANDS))
def test_out_that_is_a_file_or_under_a_file(tmp_path, no_model, command):
    (tmp_path / "file").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        fails(tmp_path, [*OUT_COMMANDS[command], "--out", str(tmp_path / "file"), *overwrite],
              f"--out {tmp_path / 'file'} is a file, not a folder")  # fmt: skip
    fails(tmp_path, [*OUT_COMMANDS[command], "--out", str(tmp_path / "file" / "sub")], "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_out_holding_other_files_or_another_commands_output(tmp_path, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    for cmd in OUT_COMMANDS.values():
        fails(tmp_path, [*cmd, "--out", str(mine), "--overwrite"], "no streamalign command wrote")
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"command": "train", "version": "0"}))
    (run / "metrics.jsonl").write_text("")
    fails(tmp_path, ["evaluate", "--out", str(run)], "holds the output of `streamalign train`", "--overwrite")
    fails(tmp_path, ["collect", "--out", str(run)], "`streamalign train`")


def test_out_read_only(tmp_path, no_model):
    if os.geteuid() == 0:
        pytest.skip("root writes into any folder; the read-only mount case is in test_real_full_and_read_only_disks")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        fails(tmp_path, ["collect", "--out", str(ro / "buf")], f"cannot write in {ro}")
        fails(tmp_path, ["evaluate", "--out", str(ro)], "cannot write")
    finally:
        ro.chmod(0o755)


def test_out_dot_and_dotdot(tmp_path, no_model, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    fails(tmp_path, ["evaluate", "--out", "."], "--out . is the current folder")  # empty: it would be replaced
    (here / "notes.md").write_text("keep")
    fails(tmp_path, ["evaluate", "--out", "."], "--out . holds files that no streamalign command wrote")
    fails(tmp_path, ["evaluate", "--out", ".."], "--out .. holds files that no streamalign command wrote")
    fails(tmp_path, ["merge", "--on", "a", "--out", "..", "--overwrite"], "--out ..")


@pytest.fixture
def files_dir(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    (d / "syntax.yaml").write_text("mode: semi\noptim: {lr: 1.0e-4\nschedule: {steps: 2}\n")
    (d / "key.yaml").write_text("mode: semi\noptim:\n  lrr: 0.1\n")
    (d / "section.yaml").write_text("mode: semi\noptimm: {lr: 0.1}\n")
    (d / "prompts.txt").write_bytes(b"a red circle moving left on a black background\n\xff\xfe oops\n")
    return d


def test_run_files_and_settings(tmp_path, files_dir, no_model):
    out = ["--out", str(tmp_path / "o")]
    d = files_dir
    fails(tmp_path, ["train", "--run-config", str(d / "syntax.yaml"), *out], f"{d / 'syntax.yaml'}:3", "YAML")
    fails(tmp_path, ["train", "--run-config", str(d / "key.yaml"), *out],
          f"unknown setting 'optim.lrr' in {d / 'key.yaml'}", "did you mean 'lr'")  # fmt: skip
    fails(tmp_path, ["train", "--run-config", str(d / "section.yaml"), *out],
          f"unknown setting 'optimm' in {d / 'section.yaml'}", "did you mean 'optim'")  # fmt: skip
    fails(tmp_path, ["train", "--run-config", str(d / "nope.yaml"), *out], f"run config {d / 'nope.yaml'} not found")
    fails(tmp_path, ["train", "--mode", "on", "--batch-groups", "0", *out], "optim.batch_groups", "--batch-groups")
    fails(tmp_path, ["evaluate", "--seeds", "0", *out], "eval.seeds_per_prompt", "(--seeds)")
    fails(tmp_path, ["experiment", "noise-sources", "--seeds", "0", *out], "study.seeds", "(--seeds)")
    fails(tmp_path, ["experiment", "noise-sources", "--n-prompts", "0", *out], "study.n_prompts")
    fails(tmp_path, ["experiment", "objectives", "--eval-seeds", "0", *out], "study.eval_seeds", "(--eval-seeds)")
    fails(tmp_path, ["train", "--mode", "on", "--eval-every", "1", "--eval-prompts", "0", *out], "(--eval-prompts)")
    fails(tmp_path, ["shapes", "check", "--videos", "0"], "(--videos)")
    fails(tmp_path, ["generate", "--prompts", str(d / "prompts.txt"), *out], f"prompt file {d / 'prompts.txt'}, line 2")
    fails(tmp_path, ["train", *TRAIN_ON, "--resume", "--overwrite", *out], "--resume", "--overwrite")


def test_checks_after_the_model_loads_leave_nothing(tmp_path):
    """Input checks that need the model (rollout settings, the generation plan, weights) fail before
    anything is written: no run.yaml, no empty metrics.jsonl, no empty folder."""
    fails(tmp_path, ["train", *TRAIN_ON, "--clip-chunks", "99", "--out", str(tmp_path / "t")], "--clip-chunks 99")
    fails(tmp_path, ["collect", "--rewards", "bogus=1", "--out", str(tmp_path / "b")], "unknown reward 'bogus'")
    fails(tmp_path, ["generate", PROMPT, "--window", "1", "--out", str(tmp_path / "g")], "--window 1")
    ints = tmp_path / "int.safetensors"
    save_file({k: v.to(torch.int32) for k, v in load_file(SHAPES).items()}, str(ints))
    fails(tmp_path, ["generate", PROMPT, "--checkpoint", str(ints), "--out", str(tmp_path / "g")],
          f"checkpoint {ints}", "int32")  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 1-step on-policy run of the shipped shapes model with its checkpoint."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = CliRunner().invoke(app, ["train", *TRAIN_ON, "--save-every", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _resume(tmp_path: Path, trained: Path, damage, *expect: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    damage(ckpt)
    msg = fails(tmp_path, ["train", *TRAIN_ON, "--save-every", "1", "--steps", "2", "--resume", "--out", str(run)],
                *expect)
    assert "weights_only=False" not in msg


def test_pickled_optimizer_state(tmp_path, trained):
    def pickle_it(ckpt):
        torch.save({"state": {}, "param_groups": [], "note": argparse.Namespace(lr=1)}, ckpt / "optimizer.pt")

    _resume(tmp_path, trained, pickle_it, "optimizer.pt", "pickled Python objects", "never unpickles")


def test_truncated_checkpoint_adapter(tmp_path, trained):
    def truncate(ckpt):
        f = ckpt / "adapter" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])

    _resume(tmp_path, trained, truncate, "adapter_model.safetensors", "truncated")


def test_corrupt_progress_file(tmp_path, trained):
    _resume(tmp_path, trained, lambda ckpt: (ckpt / "progress.json").write_text('{"step": 1,'), "progress.json")


@pytest.fixture(scope="module")
def buffer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("buffer") / "buf"
    r = CliRunner().invoke(app, ["collect", "--out", str(out), "--groups", "1", "-G", "2"])
    assert r.exit_code == 0, r.output
    return out


def test_stats_output_that_is_a_folder(tmp_path, buffer):
    fails(tmp_path, ["stats", str(buffer), "--sql", "SELECT 1", "--output", str(tmp_path)], f"{tmp_path} is a folder")


@pytest.fixture
def full_disk(monkeypatch):
    """Every fsync fails with ENOSPC (a full disk reports it there under delayed allocation)."""

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)


def test_disk_full(tmp_path, buffer, full_disk):
    full = "no space left on device writing"
    fails(tmp_path, ["collect", "--out", str(tmp_path / "b"), "--groups", "1", "-G", "2"], f"{full} {tmp_path}/b/")
    fails(tmp_path, ["train", *TRAIN_ON, "--out", str(tmp_path / "t")], f"{full} {tmp_path}/t")
    fails(tmp_path, ["generate", PROMPT, "--frames", "3", "--out", str(tmp_path / "g")], f"{full} {tmp_path / 'g'}")
    fails(tmp_path, ["model", "convert", SHAPES, str(tmp_path / "c.safetensors"), "-c", "shapes"],
          f"{full} {tmp_path / 'c.safetensors'}")  # fmt: skip
    for fmt in ("csv", "parquet"):
        fails(tmp_path, ["stats", str(buffer), "--sql", "SELECT * FROM manifest", "--format", fmt, "--output",
                         str(tmp_path / f"s.{fmt}")], f"{full} {tmp_path / f's.{fmt}'}")  # fmt: skip


def test_disk_full_is_recognised_whatever_library_wrote(tmp_path, monkeypatch):
    """The words of each writer on a full disk (as seen on a real one: tests/disk_cases.py)."""
    from safetensors import SafetensorError

    says = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert files.disk_full(OSError(errno.ENOSPC, "full"), tmp_path) and files.disk_full(says, tmp_path)
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    assert files.disk_full(torch_save, tmp_path) and not files.disk_full(RuntimeError("shape mismatch"), tmp_path)
    monkeypatch.setattr(files, "free_bytes", lambda path: 2**30)
    assert not files.disk_full(torch_save, tmp_path)  # plenty of space: some other failure, kept as it is
    out = tmp_path / "out"
    with pytest.raises(OSError) as e, files.staged_folder(out) as tmp:
        (tmp / "x").write_text("half")
        raise says
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert not any(tmp_path.iterdir())


CASES = Path(__file__).with_name("disk_cases.py")


@pytest.mark.slow
def test_real_full_and_read_only_disks(tmp_path, buffer):
    """A 6 MiB tmpfs filled to its last pages and a read-only tmpfs, mounted in a user namespace (no root
    needed where the system allows unprivileged ones): every command is one line, no partial file."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no user namespaces here")
    (tmp_path / "full").mkdir()
    (tmp_path / "ro").mkdir()
    mount = (f"mount -t tmpfs -o size=6m tmpfs {tmp_path / 'full'} && "
             f"mount -t tmpfs -o ro,size=64k tmpfs {tmp_path / 'ro'} && "
             f"exec {sys.executable} {CASES} {tmp_path} {buffer} {SHAPES}")  # fmt: skip
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", mount], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    results = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 9, r.stdout + r.stderr
    for res in results:
        assert res["exit"] == 2 and len(res["stderr"]) == 1, res
        assert res["expect"] in res["stderr"][0] and "Traceback" not in res["output"], res
        assert not res["left"], res  # no temporaries, no empty or partial files, nothing new
