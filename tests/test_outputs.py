"""Output folders: the marker, when a command may write into an existing --out (--overwrite), the one-step
swap that never leaves --out missing (and its fallback), staged generate, PID-aware cleanup of leftovers."""

from __future__ import annotations

import json
import os
import threading

import pytest
from typer.testing import CliRunner

from streamalign import __version__
from streamalign.cli import app
from streamalign.io import files
from streamalign.io.files import exchange, replace_folder, staged_folder
from streamalign.io.outputs import MARKER, check_output, open_output, permit_overwrite, written_by

run = CliRunner().invoke


def _folder(path, **content):
    path.mkdir(parents=True)
    for name, text in content.items():
        (path / name).write_text(text)
    return path


def _marked(path, command, **content):
    return _folder(path, **{MARKER: json.dumps({"command": command, "version": __version__}), **content})


def test_check_output_rules(tmp_path):
    check_output(tmp_path / "new", "evaluate")  # absent
    check_output(_folder(tmp_path / "empty"), "evaluate")
    check_output(_marked(tmp_path / "eval", "evaluate", **{"report.json": "{}"}), "evaluate")  # its own
    legacy = _folder(tmp_path / "legacy", **{"run.yaml": "streamalign: {stage: merge}\nconfig: {}\n"})
    assert written_by(legacy) == "merge"  # an older version's run.yaml names its stage
    check_output(legacy, "merge")
    other = _marked(tmp_path / "gen", "generate", **{"0000.mp4": "v"})
    with pytest.raises(FileExistsError, match=r"holds the output of `streamalign generate`.*--overwrite"):
        check_output(other, "evaluate")
    check_output(other, "evaluate", overwrite=True)
    mine = _folder(tmp_path / "notes", **{"notes.txt": "mine"})
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"no streamalign command wrote.*never replaced"):
            check_output(mine, "evaluate", overwrite)
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a file, not a folder"):
            check_output(tmp_path / "file", "merge", overwrite)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_output(tmp_path / "file" / "sub", "merge")


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    if files._renameat2 is None:
        pytest.skip("no renameat2 on this system")
    a, b = _folder(tmp_path / "a", x="a"), _folder(tmp_path / "b", y="b")
    assert exchange(a, b)
    assert (a / "y").read_text() == "b" and (b / "x").read_text() == "a"


def test_staged_folder_replaces_out_without_a_missing_moment(tmp_path, monkeypatch):
    """With the exchange, `out` is never renamed away (checked on every rename) and a watcher polling
    it during 60 replacements never finds it missing."""
    if files._renameat2 is None:
        pytest.skip("no renameat2 on this system")
    out = _folder(tmp_path / "out", v="0")
    moved_away = []
    real_replace, real_rename = os.replace, os.rename
    monkeypatch.setattr(files.os, "replace", lambda a, b: (moved_away.append(a) if str(a) == str(out) else None,
                                                          real_replace(a, b))[1])  # fmt: skip
    monkeypatch.setattr(files.os, "rename", lambda a, b: (moved_away.append(a) if str(a) == str(out) else None,
                                                         real_rename(a, b))[1])  # fmt: skip
    monkeypatch.setattr(files, "fsync_path", lambda p: None)  # speed: durability is not what this checks
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not out.is_dir():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 61):
            with staged_folder(out) as tmp:
                (tmp / "v").write_text(str(i))
    finally:
        stop.set()
        watcher.join()
    assert not moved_away and not missing
    assert (out / "v").read_text() == "60" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_the_exchange_two_renames_replace_out(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_renameat2", None)  # another system: no renameat2
    out = _folder(tmp_path / "out", v="old", extra="gone")
    with staged_folder(out) as tmp:
        (tmp / "v").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["v"] and (out / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it
    with pytest.raises(FileExistsError, match="is a file"):
        (tmp_path / "f").write_text("x")
        replace_folder(_folder(tmp_path / "n"), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_a_failed_block_keeps_the_previous_output(tmp_path):
    out = _folder(tmp_path / "out", v="old")
    with pytest.raises(RuntimeError), staged_folder(out) as tmp:
        (tmp / "v").write_text("half")
        raise RuntimeError("killed")
    assert (out / "v").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_open_output_continues_its_own_and_replaces_on_overwrite(tmp_path):
    out = open_output(tmp_path / "buf", "collect")
    assert json.loads((out / MARKER).read_text()) == {"command": "collect", "version": __version__}
    (out / "shard").write_text("s")
    open_output(out, "collect")  # a re-run continues
    assert (out / "shard").exists()
    with pytest.raises(FileExistsError, match="`streamalign collect`"):
        open_output(out, "train")
    with permit_overwrite(out):
        open_output(out, "train")
    assert sorted(p.name for p in out.iterdir()) == [MARKER] and written_by(out) == "train"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["buf"]


def test_reopening_removes_killed_runs_temporaries_only(tmp_path, pids):
    """collect / train re-open their output: temporaries of dead processes go (in it, below it, beside it),
    a live writer's (a concurrent collect) stay."""
    dead, live = pids
    buf = _marked(tmp_path / "buf", "collect", **{f".shard-000000.tar.tmp-{dead}": "x", "shard-000002.tar": "x",
                                                  f".shard-000001.tar.tmp-{live}": "x"})  # fmt: skip
    _folder(buf / "manifest", **{f".shard-000000.tar.parquet.tmp-{dead}": "x"})
    _folder(tmp_path / f".buf.old-{dead}", old="x")
    open_output(buf, "collect")
    assert sorted(p.name for p in buf.iterdir()) == [f".shard-000001.tar.tmp-{live}", MARKER, "manifest",
                                                     "shard-000002.tar"]  # fmt: skip
    assert not any((buf / "manifest").iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["buf"]


def test_user_files_survive_evaluate_even_with_overwrite(tmp_path):
    mine = _folder(tmp_path / "mine", **{"notes.md": "keep"})
    for extra in ([], ["--overwrite"]):
        r = run(app, ["evaluate", "--out", str(mine), *extra])
        assert r.exit_code == 2 and "no streamalign command wrote" in r.stderr, r.output
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]


def test_generate_replaces_whole_and_other_commands_need_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "gen"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left on a black background\na blue square moving up on a black background")
    assert run(app, ["generate", "--prompts", str(prompts), "--out", str(out), "--frames", "3"]).exit_code == 0
    assert written_by(out) == "generate" and (out / "0001.mp4").exists()
    # a re-run that fails half-way keeps the previous output whole (nothing mixed, nothing beside it)
    import streamalign.generate.run as gen

    real, calls = gen.generate_video, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(gen, "generate_video", second_fails)
    assert run(app, ["generate", "--prompts", str(prompts), "--out", str(out), "--seed", "5"]).exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(gen, "generate_video", real)
    # the same command replaces its output whole: the second video of the earlier run is gone
    r = run(app, ["generate", "a green circle moving right on a black background", "--out", str(out), "--frames", "3"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "0000.mp4", "generate.json", "run.yaml"]
    assert len(json.loads((out / "generate.json").read_text())["videos"]) == 1
    # another command refuses it without --overwrite, replaces it with
    args = ["collect", "--out", str(out), "--groups", "1", "-G", "2"]
    r = run(app, args)
    assert r.exit_code == 2 and "holds the output of `streamalign generate`" in r.stderr, r.output
    assert run(app, [*args, "--overwrite"]).exit_code == 0
    assert written_by(out) == "collect" and not (out / "0000.mp4").exists()
    r = run(app, args)  # its own output: the re-run continues (resumes) it
    assert r.exit_code == 0 and "skipped 1 finished" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "p.txt"]


def test_resume_and_overwrite_contradict(tmp_path):
    r = run(app, ["train", "--mode", "on", "--out", str(tmp_path / "t"), "--resume", "--overwrite"])
    assert r.exit_code == 2 and "give one of them" in r.stderr, r.output
    assert not (tmp_path / "t").exists()
