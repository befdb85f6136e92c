"""Atomic outputs: one writer for files and file trees (``atomic_path``), one for output folders
(``staged_folder``), and the checksums and sizes of what they wrote.

Both build the output beside its final place under a hidden temporary name and make it visible only
when it is complete, so a crash or an error never leaves a half-written file or folder behind. A folder
replaces a previous one in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so there is no moment
without it. A process killed mid-write (SIGKILL, OOM) does leave its hidden ``.NAME.tmp-PID`` /
``.NAME.old-PID``; later writes remove those whose PID is no longer running (``remove_stale``). A write
that runs out of space is one ``OSError(ENOSPC)`` naming the output, whatever library did the writing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
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


def files_digest(files: dict[str, bytes]) -> str:
    """The :func:`checksum` of a file (``{'': bytes}``) or a folder (relative '/' path -> bytes) held in
    memory, as it would be on disk: files in the order :func:`tree_files` lists them."""
    from pathlib import PurePosixPath

    h = hashlib.sha256()
    for rel in sorted(files, key=lambda r: PurePosixPath(r).parts):
        if rel:
            h.update(rel.encode() + b"\0")
        h.update(files[rel])
    return h.hexdigest()


def read_tree(path: Path) -> tuple[str, dict[str, bytes]]:
    """(checksum, bytes) of a file or folder read once: the digest :func:`checksum` gives, computed while
    reading, and every file's bytes by relative path ('' for a file)."""
    files: dict[str, bytes] = {}
    return _hash_tree(path, files), files


def require_paths(*given: tuple[str | Path | None, str]) -> None:
    """One clear error for the first (path, what) whose path does not exist; None paths are skipped; a
    ``hf://`` id must resolve (:mod:`streamalign.io.hub`: cached, or downloaded where allowed)."""
    from .hub import is_hub_id, resolve

    for path, what in given:
        if is_hub_id(path):
            resolve(path)
        elif path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{what} {path} does not exist")


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree (a link: the link, never what it points to)."""
    if path.is_symlink():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp|old|probe)-(?P<pid>[0-9]+)")


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


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` (and ``.NAME.probe-PID``: a write test)
    entries of `folder` (of one NAME, or of any) that processes no longer running left behind; a live
    PID's (this process's, a concurrent writer's) are kept. Returns those removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _TEMPORARY.fullmatch(entry.name)
        if m is None or (name is not None and m["name"] != name) or pid_alive(int(m["pid"])):
            continue
        remove_path(entry)
        removed.append(entry)
    return removed


def remove_stale_tree(folder: Path) -> list[Path]:
    """``remove_stale`` in `folder` and in every folder below it (links are not followed)."""
    removed = []
    for top, dirs, _ in os.walk(folder):
        gone = remove_stale(Path(top))
        dirs[:] = [d for d in dirs if Path(top, d) not in gone]
        removed += gone
    return removed


def remove_stale_siblings(target: Path) -> list[Path]:
    """Remove the stale ``.NAME.tmp-PID`` / ``.NAME.old-PID`` siblings of `target` (see ``remove_stale``)."""
    return remove_stale(target.parent, target.name)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_SAYS_FULL = ("no space left on device", "os error 28", "disk quota exceeded")
_WRITER_FAILED = ("inline_container", "pytorchstreamwriter", "file write failed")  # torch.save's words


def free_bytes(path: Path) -> int | None:
    """Bytes this process may still write on the file system of `path` (None: unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space: an OSError ENOSPC / EDQUOT, a library error that says so
    (safetensors), or torch.save's writer failure while the file system of `where` has under 1 MiB left
    (torch does not say why it failed)."""
    text = str(e).lower()
    if (isinstance(e, OSError) and e.errno in DISK_FULL) or any(t in text for t in _SAYS_FULL):
        return True
    free = free_bytes(where) if any(t in text for t in _WRITER_FAILED) else None
    return free is not None and free < 2**20


def disk_full_error(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def _naming_full_disk(path: Path, where: Path) -> Iterator[None]:
    """Re-raise an out-of-space failure of the block as ``OSError(ENOSPC, path)``; `where`: a path on the
    file system written (checked before the temporaries are removed, which frees their space)."""
    try:
        yield
    except Exception as e:
        if disk_full(e, where):
            raise disk_full_error(path) from None
        raise


AT_FDCWD, RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot (then nothing moved)."""
    if _renameat2 is None:
        return False
    if _renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_folder(new: Path, out: Path) -> Path | None:
    """Put the folder `new` at `out`. A previous `out` is exchanged with it in one step, so `out` never
    goes missing, and ends up at `new`'s path; returned for the caller to remove (None: there was none).
    Without the exchange (other systems) the previous `out` is renamed aside first."""
    if not out.exists() and not out.is_symlink():
        os.rename(new, out)
        return None
    if not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: streamalign never replaces a file with a folder")
    if exchange(new, out):
        return new
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    return old


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path (nothing there yet) for the caller to write a file or a folder
    into. On success every file is fsynced and the temporary renamed to `path` (replacing a previous
    file when `overwrite`, else refusing an existing one); on failure it is removed."""
    path = Path(path)
    if not overwrite and path.exists():  # a finished output (a file, or a folder such as a zarr shard)
        raise FileExistsError(f"{path} already exists: a finished output is never overwritten")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give the path of a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    try:
        with _naming_full_disk(path, path.parent):
            yield tmp
            for f in tree_files(tmp):
                fsync_path(f)
        if not overwrite and path.exists():
            raise FileExistsError(f"{path} already exists: a finished output is never overwritten")
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        remove_path(tmp)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a whole file atomically (see ``atomic_path``): text as UTF-8, or bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a log row) whole or not at all: a failed write (a full disk) is cut off again, so
    the file never ends in half a row; the error names the file."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as e:
            os.ftruncate(fd, size)
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `out`. When the block succeeds its files are fsynced and it
    takes `out`'s place in one step (``replace_folder``: a previous `out` is exchanged with it, then
    removed); when it fails it is removed. Nothing half-written is left behind, and there is no moment
    without `out`; stale temporaries of killed earlier runs for the same `out` are removed first."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder: streamalign never replaces a file with a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    tmp.mkdir()
    try:
        with _naming_full_disk(out, out.parent):
            yield tmp
            for f in tree_files(tmp):
                fsync_path(f)
        old = replace_folder(tmp, out)
        fsync_path(out.parent)
        if old is not None:
            remove_path(old)
    finally:
        remove_path(tmp)
