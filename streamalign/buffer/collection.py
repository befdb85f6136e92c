"""What a buffer records about each collection written into it, and the lock that keeps out a second writer.

A collection (the shards of one ``collect`` command, or of one on-policy iteration: one shard-name prefix)
is recorded in ``manifest/<prefix>collection.json`` before its first shard is written: the settings that
decide its content (by flag), its run id, the target number of groups and its shard plan. A re-run with
other settings is refused naming each one; the same settings with a larger ``--groups`` extend the plan
(the new groups go into new shards after the existing ones, so a finished shard never changes) and keep
the run id; ``buffer verify`` compares the plan with the shards written to tell an interrupted collection,
and readers compare it with the collection's integrity record (``buffer.integrity``).

``collect.lock`` is an advisory ``flock`` held while a collect writes the buffer. The kernel releases it
when its holder exits or is killed (kill -9 included), so the lock of a dead process is simply taken
over; the file names its holder (PID, host, start time) for the refusal a second writer gets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from ..io.files import atomic_path
from ..schemas.run import differences
from .parts import MANIFEST_DIR
from .urls import location

RECORD = "collection.json"
LOCK = "collect.lock"
log = logging.getLogger("streamalign.buffer")


def shard_name(k: int, suffix: str, prefix: str = "") -> str:
    return f"shard-{prefix}{k:06d}{suffix}"


@dataclass
class Collection:
    """One collection of a buffer: its shard-name prefix and suffix, run id, target groups, groups per
    shard, the settings that decide its content, and its plan as segments (first group, end group, first
    shard): shard ``first shard + j`` holds groups ``first + j * per_shard`` onward."""

    prefix: str
    suffix: str
    run_id: str
    groups: int
    per_shard: int
    settings: dict
    segments: list[list[int]] = field(default_factory=list)

    def plan(self) -> list[tuple[int, int, int]]:
        """(shard index, first group, end group) of every planned shard, in order."""
        out = []
        for lo, hi, k0 in self.segments:
            for j, start in enumerate(range(lo, hi, self.per_shard)):
                out.append((k0 + j, start, min(start + self.per_shard, hi)))
        return out

    def shard_names(self) -> list[str]:
        return [shard_name(k, self.suffix, self.prefix) for k, _, _ in self.plan()]

    def extended(self, groups: int) -> Collection:
        """The plan for `groups` (> self.groups): the last segment grows when its shards are all full (the
        layout a single run would have), else a new segment starts at the next shard index."""
        lo, hi, k0 = self.segments[-1]
        if (hi - lo) % self.per_shard == 0:
            segments = [*self.segments[:-1], [lo, groups, k0]]
        else:
            segments = [*self.segments, [self.groups, groups, self.plan()[-1][0] + 1]]
        return Collection(self.prefix, self.suffix, self.run_id, groups, self.per_shard, self.settings, segments)


def record_path(folder: Path, prefix: str = "") -> Path:
    return Path(folder) / MANIFEST_DIR / f"{prefix}{RECORD}"


def read_collection(path: Path) -> Collection:
    try:
        return parse_collection(path.read_bytes(), path)
    except OSError as e:
        raise ValueError(f"collection record {path} is damaged ({type(e).__name__}): restore it from a copy") from None


def parse_collection(data: bytes, where: str | Path) -> Collection:
    try:
        return Collection(**json.loads(data))
    except (ValueError, TypeError) as e:
        raise ValueError(f"collection record {where} is damaged ({type(e).__name__}): restore it from a copy") from None


def collections(folder: str | Path) -> list[Collection]:
    """Every collection a buffer (a path or URL) records."""
    where = location(folder)
    rels = [f"{MANIFEST_DIR}/{name}" for name in where.list(MANIFEST_DIR, RECORD)]
    return [parse_collection(where.read(rel), f"{where.name}/{rel}") for rel in rels]


def check_collection(folder: Path, prefix: str, run_id: str, settings: dict, groups: int) -> Collection | None:
    """The recorded collection these settings continue (None: none recorded yet). Refuses other settings
    (only those in `settings` are compared), fewer groups than recorded, and, in a buffer from before
    records, parts of another run id."""
    path = record_path(folder, prefix)
    if not path.exists():
        _check_unrecorded(Path(folder), prefix, run_id)
        return None
    rec = read_collection(path)
    changed = differences({k: rec.settings.get(k) for k in settings}, settings, was="buffer")
    if changed:
        raise ValueError(f"{folder} holds a collection with other settings: {'; '.join(changed)}; re-run with the "
                         "buffer's settings (see its run.yaml) or collect into another --out")  # fmt: skip
    if groups < rec.groups:
        raise ValueError(f"--groups {groups} is below the {rec.groups} groups the collection in {folder} targets: "
                         f"give --groups {rec.groups} (or more, to extend it)")  # fmt: skip
    return rec


def _check_unrecorded(folder: Path, prefix: str, run_id: str) -> None:
    """A buffer written before collections were recorded: its parts of this prefix must be of this run id."""
    pattern = re.compile(rf"shard-{re.escape(prefix)}\d{{6}}\..+\.parquet")
    parts = [p for p in sorted((folder / MANIFEST_DIR).glob("*.parquet")) if pattern.fullmatch(p.name)]
    ids = {i for p in parts for i in pq.read_table(p, columns=["run_id"]).column("run_id").to_pylist()}
    if ids - {run_id}:
        raise ValueError(f"{folder} holds groups of run id(s) {', '.join(sorted(ids - {run_id}))}, collected with "
                         f"other settings than this command's ({run_id}; the buffer predates recorded settings, so "
                         "they cannot be named): collect into another --out")  # fmt: skip


def claim_collection(folder: Path, prefix: str, suffix: str, run_id: str, per_shard: int, settings: dict,
                     groups: int) -> Collection:  # fmt: skip
    """Check the settings (see :func:`check_collection`) and record the collection (new, or extended to
    `groups`) before any of its shards is written; returns it."""
    rec = check_collection(folder, prefix, run_id, settings, groups)
    if rec is not None and groups == rec.groups:
        return rec
    rec = rec.extended(groups) if rec is not None else Collection(prefix, suffix, run_id, groups, per_shard,
                                                                  settings, [[0, groups, 0]])  # fmt: skip
    with atomic_path(record_path(folder, prefix)) as tmp:
        tmp.write_text(json.dumps(asdict(rec), indent=1, sort_keys=True))
    return rec


class BufferBusyError(ValueError):
    """Another process holds the buffer's lock."""


class BufferLock:
    """The exclusive writer lock of a buffer folder (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: int | None = None

    def __enter__(self) -> BufferLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise busy_error(self.folder, holder) from None
            try:  # the holder may have released (and removed) the file between our open and flock
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0)
        if previous.strip():
            log.info("taking over the lock of a collect that is no longer running (%s)", _holder(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def moved(self, folder: str | Path) -> BufferLock:
        """The lock, still held, after its folder was moved to `folder` (``collect --overwrite`` swaps in a
        fresh folder whose lock it took first)."""
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:  # our own file only (after a swap the path may hold the next lock), while still held:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:  # a waiting opener retries on a new one
                    self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None


def lock_holder(folder: str | Path) -> str | None:
    """Who holds the buffer's lock (PID, host, since) while a live process does, else None: a check made
    before any model loads (the lock itself is taken before the folder is touched)."""
    try:
        fd = os.open(Path(folder) / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _holder(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)


def busy_error(folder: str | Path, holder: str) -> BufferBusyError:
    return BufferBusyError(f"buffer {folder} is being written by another collect ({holder}): wait for it to "
                           "finish, or collect into another --out")  # fmt: skip


def _holder(data: bytes) -> str:
    try:
        h = json.loads(data)
        return f"PID {h['pid']} on host {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
