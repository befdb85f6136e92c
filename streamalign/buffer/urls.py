"""Where a buffer's bytes live, apart from how they are laid out (the shard formats): a URL naming the
buffer's root, every file addressed by its path relative to it (``shard-000001.tar``,
``manifest/shard-000001.tar.parquet``).

- a plain path or ``file://PATH``: the local file system (what ``collect`` writes);
- ``s3://``, ``gs://`` and any other fsspec protocol (``memory://`` in tests): through fsspec and its
  file systems (``pip install 'streamalign[remote]'``); credentials are the file system's own;
- ``pipe:CMD``: read-only, each file read from the stdout of ``CMD`` with ``{}`` replaced by its
  relative path (shell-quoted), e.g. ``pipe:cat /data/buf/{}`` or ``pipe:aws s3 cp s3://b/buf/{} -``.
  A command cannot list a folder: a folder's files are those its ``index.txt`` names (one a line), which
  ``collect`` writes in the manifest folder.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from ..extras import require

INDEX = "index.txt"  # a folder's file names, for locations that cannot list


class Location(Protocol):
    """A buffer root. Relative paths use '/'; `name` is how messages show the root; `folders`: whether
    a folder (a zarr shard) can be read, not only files."""

    name: str
    folders: bool

    def read(self, rel: str) -> bytes:
        """The bytes of the file at `rel` (FileNotFoundError when there is none)."""
        ...

    def tree(self, rel: str) -> dict[str, bytes]:
        """Every file of the file or folder at `rel` by path relative to it ('' for a file)."""
        ...

    def list(self, folder: str, suffix: str) -> list[str]:
        """The names (not paths) of the files in `folder` ending in `suffix`, sorted."""
        ...

    def exists(self, rel: str) -> bool: ...

    def size(self, rel: str) -> int:
        """Bytes of the file or of every file under the folder at `rel`."""
        ...

    def shard(self, rel: str) -> Path | Remote:
        """What a shard format reads the file or folder at `rel` from (a local path where there is one)."""
        ...

    def put(self, local: Path, rel: str) -> None:
        """Copy the local file or folder `local` to `rel` (its files each visible only once complete)."""
        ...


def is_url(target: str | Path) -> bool:
    """Whether `target` is a URL (scheme://... or pipe:...) rather than a plain path."""
    return isinstance(target, str) and (target.startswith("pipe:") or "://" in target)


def local_path(target: str | Path) -> Path | None:
    """The local path `target` names (a plain path or file://), None for other URLs."""
    if not is_url(target):
        return Path(target)
    return Path(str(target).removeprefix("file://")) if str(target).startswith("file://") else None


def location(target: str | Path) -> Location:
    """The location of a buffer root given as a path or URL."""
    path = local_path(target)
    if path is not None:
        return LocalLocation(path)
    target = str(target)
    if target.startswith("pipe:"):
        return PipeLocation(target)
    return FsspecLocation(target)


def local_folder(target: str | Path, what: str, instead: str) -> Path:
    """The local path of `target` (a plain path or file:// URL) for `what`, which needs one; other URLs are
    refused with `instead` (what to do)."""
    path = local_path(target)
    if path is None:
        raise ValueError(f"{what} needs a local path or file:// URL, got {target}: {instead}")
    return path


def below(rel: str) -> str:
    """`rel` when it is a relative path below a buffer root (no '..', not absolute, no '\\'); a recorded
    shard name is data, so it must never lead outside the buffer."""
    parts = PurePosixPath(rel).parts
    if not rel or "\\" in rel or PurePosixPath(rel).is_absolute() or ".." in parts or ":" in parts[0]:
        raise ValueError(f"{rel!r} is not a path inside the buffer (absolute, '..' or a URL): the manifest was "
                         "edited; restore it from a copy")  # fmt: skip
    return rel


def upload_files(local: Path, rel: str) -> list[tuple[Path, str]]:
    """(local file, relative path at the destination) of every file of the file or folder `local` put at `rel`."""
    from ..io.files import tree_files

    return [(f, rel if f == local else f"{rel}/{f.relative_to(local).as_posix()}") for f in tree_files(local)]


class LocalLocation:
    folders = True

    def __init__(self, root: Path) -> None:
        self.root, self.name = root, str(root)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def tree(self, rel: str) -> dict[str, bytes]:
        from ..io.files import read_tree

        if not (self.root / rel).exists():
            raise FileNotFoundError(self.root / rel)
        return read_tree(self.root / rel)[1]

    def shard(self, rel: str) -> Path:
        path = self.root / below(rel)
        if path.is_symlink() and not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{path} is a link to {path.resolve()}, outside the buffer: replace it with the shard")
        return path

    def put(self, local: Path, rel: str) -> None:
        from ..io.files import write_atomic

        for f, name in upload_files(local, rel):
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.root / name, f.read_bytes())

    def list(self, folder: str, suffix: str) -> list[str]:
        return sorted(p.name for p in (self.root / folder).glob(f"*{suffix}") if p.is_file())

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def size(self, rel: str) -> int:
        from ..io.files import tree_bytes

        return tree_bytes(self.root / rel)


class PipeLocation:
    """Files read from a shell command's stdout (``{}``: the file's path relative to the root)."""

    folders = False

    def __init__(self, url: str) -> None:
        self.command, self.name = url.removeprefix("pipe:"), url
        if "{}" not in self.command:
            raise ValueError(f"{url}: a pipe: URL needs '{{}}' where the file's relative path goes, "
                             "e.g. pipe:cat /data/buf/{}")  # fmt: skip

    def read(self, rel: str) -> bytes:
        cmd = self.command.replace("{}", shlex.quote(rel))
        done = subprocess.run(cmd, shell=True, capture_output=True)
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise FileNotFoundError(f"{cmd!r} exited {done.returncode}" + (f": {err[-1]}" if err else ""))
        return done.stdout

    def tree(self, rel: str) -> dict[str, bytes]:
        return {"": self.read(rel)}  # a command gives one stream: tar shards, not zarr folders

    def shard(self, rel: str) -> Remote:
        return Remote(self, below(rel))

    def put(self, local: Path, rel: str) -> None:
        raise ValueError(f"{self.name}: pipe: URLs are read-only; upload to a path, file://, s3:// or gs:// URL")

    def list(self, folder: str, suffix: str) -> list[str]:
        index = f"{folder.rstrip('/')}/{INDEX}"
        try:
            names = self.read(index).decode().split("\n")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.name}: cannot list {folder}/ without its {INDEX} ({e}); collect writes "
                                    "it: re-run the collect command on the buffer to add it") from None  # fmt: skip
        return sorted(n for n in names if n.endswith(suffix))

    def exists(self, rel: str) -> bool:
        try:
            self.read(rel)
        except FileNotFoundError:
            return False
        return True

    def size(self, rel: str) -> int:
        return len(self.read(rel))


class FsspecLocation:
    """A root on any fsspec file system (s3://, gs://, memory://, ...)."""

    folders = True

    def __init__(self, url: str) -> None:
        fsspec = require("fsspec", "remote", f"reading {url}")
        self.name = url
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:  # a protocol whose package is missing, or an unknown one
            raise ValueError(f"{url}: {e} (s3:// and gs:// need pip install 'streamalign[remote]')") from None
        self.root = self.root.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def tree(self, rel: str) -> dict[str, bytes]:
        path = self._path(rel)
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{self.name}/{rel}")
        if self.fs.isfile(path):
            return {"": self.fs.cat_file(path)}
        return {PurePosixPath(p).relative_to(path).as_posix(): self.fs.cat_file(p) for p in self.fs.find(path)}

    def shard(self, rel: str) -> Remote:
        return Remote(self, below(rel))

    def put(self, local: Path, rel: str) -> None:
        for f, name in upload_files(local, rel):  # an object store makes each file visible once complete
            self.fs.makedirs(PurePosixPath(self._path(name)).parent.as_posix(), exist_ok=True)
            self.fs.put_file(str(f), self._path(name))

    def list(self, folder: str, suffix: str) -> list[str]:
        path = self._path(folder)
        if not self.fs.exists(path):
            return []
        return sorted(PurePosixPath(p).name for p in self.fs.ls(path, detail=False) if p.endswith(suffix))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.du(self._path(rel), total=True))


@dataclass(frozen=True)
class Remote:
    """A file or folder at `rel` under a location that is not local (what a shard format reads)."""

    location: Location
    rel: str

    @property
    def name(self) -> str:
        return PurePosixPath(self.rel).name

    def __str__(self) -> str:  # pipe: the command that reads it; else the file's URL
        name = self.location.name
        return name.replace("{}", self.rel) if name.startswith("pipe:") else f"{name.rstrip('/')}/{self.rel}"
