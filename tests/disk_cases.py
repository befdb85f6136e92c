"""Run inside a user namespace by tests/test_error_catalogue.py: ROOT/full is a small tmpfs, ROOT/ro a
read-only one. Each case fills `full` to all but `keep` bytes, runs one command and prints a JSON line:
exit code, stderr lines, output, and what it left (anything new on the disk)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.cli.flags import os_error_line
from streamalign.io.files import staged_folder

root, buffer, shapes = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
full, ro = root / "full", root / "ro"
filler = full / "filler"
prompt = "a red circle moving left on a black background"
train = ["--mode", "on", "--steps", "1", "--batch-groups", "1", "-G", "2", "--lora-rank", "2", "--threads", "1"]
DISK_FULL, READ_ONLY = "no space left on device writing", "read-only file system"
PAGE = 4096

CASES = [
    # (args, bytes left free, expected text); keep: the first page goes to a marker or a small file
    (["collect", "--out", str(ro / "buf"), "--groups", "1", "-G", "2"], None, READ_ONLY),
    (["evaluate", "--out", str(ro)], None, READ_ONLY),
    (["collect", "--out", str(full / "b"), "--groups", "1", "-G", "2"], PAGE, DISK_FULL),  # the tar shard
    (["train", *train, "--out", str(full / "t")], 0, DISK_FULL),
    (["generate", prompt, "--out", str(full / "g")], PAGE, DISK_FULL),  # the MP4 (PyAV)
    (["model", "convert", shapes, str(full / "c.safetensors"), "-c", "shapes"], PAGE, DISK_FULL),  # safetensors
    (["stats", buffer, "--sql", "SELECT * FROM manifest, range(200)", "--format", "csv", "--output",
      str(full / "s.csv")], PAGE, DISK_FULL),
    (["stats", buffer, "--sql", "SELECT * FROM manifest, range(200)", "--format", "parquet", "--output",
      str(full / "s.parquet")], PAGE, DISK_FULL),
]  # fmt: skip


def fill(keep: int) -> None:
    """Leave exactly `keep` bytes free on `full` (tmpfs counts whole pages)."""
    filler.unlink(missing_ok=True)
    for entry in full.iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    st = os.statvfs(full)
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - keep)


def report(args: list[str], code: int, lines: list[str], output: str, expect: str, exception: object) -> None:
    left = sorted(str(p) for base in (full, ro) for p in base.rglob("*") if p != filler)
    print(json.dumps({"args": args, "exit": code, "stderr": lines, "output": output, "expect": expect,
                      "left": left, "exception": repr(exception)}), flush=True)  # fmt: skip


for args, keep, expect in CASES:
    if keep is not None:
        fill(keep)
    r = CliRunner().invoke(app, args)
    report(args, r.exit_code, [line for line in r.stderr.splitlines() if line.strip()], r.output, expect, r.exception)

# torch.save says only "unexpected pos" when the disk fills: a training checkpoint's optimizer state
fill(PAGE)
try:
    with staged_folder(full / "ckpt") as tmp:
        torch.save({"m": torch.zeros(1 << 16)}, tmp / "optimizer.pt")
    report(["torch.save"], 0, [], "", DISK_FULL, None)
except OSError as e:
    report(["torch.save"], 2, [f"error: {os_error_line(e)}"], "", DISK_FULL, e)
