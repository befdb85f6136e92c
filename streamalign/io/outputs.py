"""The output folders of the commands (``--out``): whose they are, and when a command may write there.

Every output folder holds a marker, ``.streamalign.json``: the command that wrote it and the streamalign
version (a ``run.yaml`` of an older version, which names its stage, counts as one). A command writes only
into an absent or empty folder, or into one its own earlier run wrote (evaluate, merge, generate, ...
replace it; collect, train and demo continue it). With ``--overwrite`` it may also replace the output of
another command. A folder holding files that no streamalign command wrote is never replaced, and a file
is never replaced by a folder. ``check_output`` applies these rules (the CLI calls it before any model
loads; the stages call it again when they write), ``output_folder`` stages a folder that replaces the
previous output in one step, ``open_output`` opens the folder of a command that continues its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from .. import __version__
from .files import (
    DISK_FULL,
    atomic_path,
    checksum,
    disk_full_error,
    remove_path,
    remove_stale_siblings,
    remove_stale_tree,
    replace_folder,
    staged_folder,
    write_atomic,
)

MARKER = ".streamalign.json"

# the --out folders the user allowed to be replaced (--overwrite), for the stages that run in this context
_OVERWRITE: contextvars.ContextVar[frozenset[Path]] = contextvars.ContextVar("overwrite", default=frozenset())


def where(out: str | Path) -> Path:
    """`out` as an absolute path with links resolved (``.`` and ``..`` have names; a link to a folder
    is replaced at its target, never turned into a folder itself)."""
    return Path(out).expanduser().resolve()


def marker_text(command: str) -> str:
    return json.dumps({"command": command, "version": __version__}) + "\n"


def written_by(folder: Path) -> str | None:
    """The command whose output `folder` is (its marker, else an older version's ``run.yaml``), or None."""
    try:
        return str(json.loads((folder / MARKER).read_text())["command"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        record = yaml.safe_load((folder / "run.yaml").read_text())
        return str(record["streamalign"]["stage"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def is_empty(folder: Path) -> bool:
    """Nothing in `folder` but, at most, a marker (a run killed right after creating its folder)."""
    return all(entry.name == MARKER for entry in folder.iterdir())


@contextlib.contextmanager
def permit_overwrite(out: str | Path) -> Iterator[None]:
    """Within the block, the stages may replace the output at `out` even when another command wrote it."""
    token = _OVERWRITE.set(_OVERWRITE.get() | {where(out)})
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def overwrite_permitted(out: str | Path) -> bool:
    return where(out) in _OVERWRITE.get()


def check_output(out: str | Path, command: str, overwrite: bool | None = None, writable: bool = True) -> Path:
    """Refuse an `out` the command `command` may not write (one line: what, where, how to fix); returns
    it resolved. `overwrite`: the user's ``--overwrite`` (None: as permitted in this context);
    `writable`: also try writing there."""
    path = where(out)
    overwrite = overwrite_permitted(out) if overwrite is None else overwrite
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder: choose another --out "
                              "(a file is never replaced by a folder)")  # fmt: skip
    if path.is_dir() and not is_empty(path):
        by = written_by(path)
        if by is None:
            raise FileExistsError(f"--out {out} holds files that no streamalign command wrote (no {MARKER}): "
                                  "choose a new or empty folder; they are never replaced, even with --overwrite")
        if by != command and not overwrite:
            raise FileExistsError(f"--out {out} holds the output of `streamalign {by}`: choose another --out, "
                                  "or pass --overwrite to replace it")  # fmt: skip
    if writable:
        check_writable(path, out)
    return path


def check_writable(path: Path, given: str | Path) -> None:
    """`path`, or the folder it will be created in, must be a folder this process can write in (tried:
    a temporary folder is made and removed, which also finds read-only mounts and a full disk; it is
    named like the stage's own temporaries, so a later run removes it should this process be killed)."""
    base, child = path, path
    while not base.exists() and base != base.parent:
        base, child = base.parent, base
    if not base.is_dir():
        raise NotADirectoryError(f"--out {given}: {base} is a file, not a folder: choose another --out")
    probe = base / f".{MARKER if base == path else child.name}.probe-{os.getpid()}"
    try:
        remove_path(probe)
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(base) from None
        raise PermissionError(f"--out {given}: cannot write in {base} ({e.strerror.lower()}): choose a "
                              "writable folder") from None  # fmt: skip


def refuse_current_folder(path: Path, given: str | Path) -> None:
    """A folder replaced in one step cannot be the current folder or hold it."""
    if Path.cwd().resolve().is_relative_to(path):
        raise ValueError(f"--out {given} is the current folder or holds it, which the output would replace: "
                         "give a new folder below it")  # fmt: skip


@contextlib.contextmanager
def output_folder(out: str | Path, command: str, record: str | None = None) -> Iterator[Path]:
    """Stage the output of `command`: yield an empty temp folder beside `out`; when the block succeeds it
    gets the marker (and `record` as ``run.yaml``) and replaces `out` in one step (``staged_folder``).
    The rules of ``check_output`` hold when the block starts and when it ends."""
    path = check_output(out, command)
    refuse_current_folder(path, out)
    with staged_folder(path) as tmp:
        yield tmp
        if record is not None:
            (tmp / "run.yaml").write_text(record)
        (tmp / MARKER).write_text(marker_text(command))
        check_output(out, command, writable=False)  # still ours to replace (nobody wrote there meanwhile)


def open_output(out: str | Path, command: str, prepare: Callable[[Path], None] | None = None) -> Path:
    """The folder of a command that continues its own earlier output (collect extends a buffer, train
    resumes a run, demo both): checked, created with its marker when new. Where ``--overwrite`` permits
    it, a previous output is replaced by a fresh folder in one step (``replace_folder``; `prepare` is
    called on the fresh folder first: collect takes its lock there). Temporaries that killed runs left in
    it or beside it are removed (those of live processes are kept)."""
    path = check_output(out, command)
    remove_stale_siblings(path)
    remove_stale_tree(path)
    if path.is_dir() and not is_empty(path) and overwrite_permitted(out):
        fresh = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        remove_path(fresh)
        fresh.mkdir()
        (fresh / MARKER).write_text(marker_text(command))
        if prepare is not None:
            prepare(fresh)
        old = replace_folder(fresh, path)
        if old is not None:
            remove_path(old)
        _OVERWRITE.set(_OVERWRITE.get() - {path})  # replaced once: what this run writes next is kept
        return path
    path.mkdir(parents=True, exist_ok=True)
    if written_by(path) != command or not (path / MARKER).is_file():
        write_atomic(path / MARKER, marker_text(command))
    return path


def file_marker(path: Path) -> Path:
    """The marker of an output file: ``.NAME.streamalign.json`` beside it (the command, the version and the
    file's sha256, so a file edited since is the user's, not streamalign's)."""
    return path.with_name(f".{path.name}{MARKER}")


def file_written_by(path: Path) -> str | None:
    """The command that wrote the file at `path`, or None (no marker, or the file changed since)."""
    try:
        record = json.loads(file_marker(path).read_text())
        return str(record["command"]) if path.is_file() and record["sha256"] == checksum(path) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output_file(path: str | Path, flag: str, overwrite: bool) -> Path:
    """Refuse an output file that would replace a file no streamalign command wrote (even with
    `overwrite`), or one that a command wrote unless `overwrite`; returns it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder: give the path of a file")
    if path.exists() or path.is_symlink():
        by = file_written_by(path)
        if by is None:
            raise FileExistsError(f"{flag} {path} exists and no streamalign command wrote it (or it was edited "
                                  f"since): it is never replaced, even with --overwrite; choose another {flag}")
        if not overwrite:
            raise FileExistsError(f"{flag} {path} holds the output of `streamalign {by}`: pass --overwrite to "
                                  f"replace it, or choose another {flag}")  # fmt: skip
    return path


@contextlib.contextmanager
def output_file(path: str | Path, flag: str, command: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path for the output file `path` of `command` (given by `flag`), checked by
    :func:`check_output_file`; when the block succeeds it replaces `path` atomically and gets its marker."""
    path = check_output_file(path, flag, overwrite)
    with atomic_path(path, overwrite=path.exists()) as tmp:  # a file that appeared meanwhile is refused
        yield tmp
    record = {"command": command, "version": __version__, "sha256": checksum(path)}
    write_atomic(file_marker(path), json.dumps(record) + "\n")


def missing_folders(out: str | Path) -> list[Path]:
    """The folders from `out` up to the first existing one that do not exist yet (deepest first)."""
    path, missing = where(out), []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _unused(folder: Path) -> bool:
    """Nothing in `folder` but a marker and folders holding nothing either."""
    return all(e.name == MARKER or (e.is_dir() and not e.is_symlink() and _unused(e)) for e in folder.iterdir())


def remove_unused(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first, as ``missing_folders`` gives them) that a failed command
    created and left holding nothing but a marker and empty folders; stop at the first holding more."""
    for folder in folders:
        if not folder.is_dir() or not _unused(folder):
            return
        remove_path(folder)


def clear_unused(folder: Path) -> None:
    """Empty `folder` (kept: it was there before) when a failed command left in it nothing but a marker
    and empty folders."""
    if folder.is_dir() and _unused(folder):
        for entry in folder.iterdir():
            remove_path(entry)
