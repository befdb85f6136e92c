"""Atomic outputs: one writer for files and file trees (``atomic_path``), one for output folders
(``staged_folder``), and the checksums and sizes of what they wrote.

Both build the output beside its final place under a hidden temporary name and make it visible only
when it is complete, so a crash or an error never leaves a half-written file or folder behind. A process
killed mid-write (SIGKILL, OOM) does leave its hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID``; the next
write of the same target removes those whose PID is no longer running (``remove_stale_siblings``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


def tree_files(path: Path) -> list[Path]:
    """The files of an output: itself (a file) or every file under it (a folder), sorted."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def tree_bytes(path: Path) -> int:
    """Size on disk of a file or of every file under a folder."""
    return sum(f.stat().st_size for f in tree_files(path))


def _hash_tree(path: Path, keep: dict[str, bytes] | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's every file (relative path and bytes); with `keep`, the
    bytes read are also stored there by relative path ('' for a file)."""
    h = hashlib.sha256()
    for f in tree_files(path):
        rel = str(f.relative_to(path)) if path.is_dir() else ""
        if path.is_dir():
            h.update(rel.encode() + b"\0")
        blocks = []
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
                if keep is not None:
                    blocks.append(block)
        if keep is not None:
            keep[rel] = b"".join(blocks)
    return h.hexdigest()


def checksum(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's every file (relative path and bytes)."""
    return _hash_tree(path)


def read_tree(path: Path) -> tuple[str, dict[str, bytes]]:
    """(checksum, bytes) of a file or folder read once: the digest :func:`checksum` gives, computed while
    reading, and every file's bytes by relative path ('' for a file)."""
    files: dict[str, bytes] = {}
    return _hash_tree(path, files), files


def require_paths(*given: tuple[str | Path | None, str]) -> None:
    """One clear error for the first (path, what) whose path does not exist; None paths are skipped."""
    for path, what in given:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist")


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SIBLING = re.compile(r"(?:tmp|old)-(?P<pid>[0-9]+)")


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    if pid <= 0:
        return True  # 0 / negative address process groups: never treat such a name as stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False  # no such pid can exist
    return True


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of `target` that processes no
    longer running left behind (a live PID's, this process's included, are kept); returns those removed."""
    prefix = f".{target.name}."
    removed = []
    if not target.parent.is_dir():
        return removed
    for sib in target.parent.iterdir():
        if not sib.name.startswith(prefix):
            continue
        m = _SIBLING.fullmatch(sib.name[len(prefix) :])
        if m is None or pid_alive(int(m["pid"])):
            continue
        sib.unlink() if sib.is_symlink() else remove_path(sib)  # a link: remove it, never what it points to
        removed.append(sib)
    return removed


def remove_stale_temporaries(folder: Path) -> int:
    """Remove every hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` directly in `folder` whose process no longer
    runs (see :func:`remove_stale_siblings`); returns how many were removed."""
    if not folder.is_dir():
        return 0
    targets = {folder / m["name"] for p in folder.glob(".*") if (m := _HIDDEN.fullmatch(p.name)) is not None}
    return sum(len(remove_stale_siblings(t)) for t in sorted(targets))


_HIDDEN = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-[0-9]+")


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path (nothing there yet) for the caller to write a file or a folder
    into. On success every file is fsynced and the temporary renamed to `path` (replacing a previous
    file when `overwrite`, else refusing an existing one); on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
        for f in tree_files(tmp):
            fsync_path(f)
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} already exists: a finished output is never overwritten")
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        remove_path(tmp)


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`. When the block succeeds it takes `out`'s place (a previous
    `out` is moved aside first and removed after); when it fails it is removed. Nothing half-written is
    left behind; stale temporaries of killed earlier runs for the same `out` are removed first."""
    out = Path(out)
    remove_stale_siblings(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
