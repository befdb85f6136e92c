"""Shard storage backends behind one interface: webdataset tar shards and zarr v3 groups.

A shard holds whole entries and is written at once. ``write_shard`` makes it visible only when complete
(temporary sibling, fsync, rename) and returns its sha256 checksum; a format's ``read(path, digest)`` yields
validated entries in the order they were written. Given the manifest's checksum it hashes the shard's
bytes as it reads them (one pass, the shard held in memory until it is verified) and refuses a damaged
shard before yielding any entry. No pickle anywhere: tensors travel as safetensors bytes (tar) or typed
zarr arrays (bfloat16 as uint16 with the logical dtype in the attributes).

Zarr fills a chunk that is absent from the store with the fill value (zeros), so an absent chunk would
read as data. Every chunk is therefore written, all-zero ones included (``write_empty_chunks``), and an
absent one is an error; a shard whose checksum matched needs no such check (the checksum covers the list
of files, so a deleted chunk cannot pass it; older shards that left out all-zero chunks stay readable).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Protocol

import numpy as np
import torch
from pydantic import AfterValidator, WithJsonSchema

from ..io.files import atomic_path, checksum, files_digest, read_tree, tree_bytes
from ..registry import Registry
from ..schemas.buffer import Entry, SchemaError
from .urls import Remote

ENTRY_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits keys at the first dot


class ShardFormat(Protocol):
    name: str
    suffix: str

    def write(self, path: Path, entries: Sequence[Entry]) -> None: ...

    def read(self, path: Path | Remote, digest: str | None = None) -> Iterator[Entry]: ...


class DamagedShardError(SchemaError):
    """A shard is missing or its bytes differ from the checksum the manifest recorded."""


def checksum_mismatch(name: str | Path, got: str, digest: str) -> str:
    return f"{name}: checksum {got[:12]}... != manifest {digest[:12]}... (altered or truncated)"


def shard_bytes(path: Path | Remote, digest: str | None) -> dict[str, bytes]:
    """Every file of a shard (a local path, or a file or folder under a buffer URL) by relative path ('' for
    a file), read once; with `digest` (the manifest's checksum) verified against the hash of the bytes
    read: DamagedShardError when they differ."""
    if isinstance(path, Remote):
        try:
            files = path.location.tree(path.rel)
        except FileNotFoundError as e:
            raise DamagedShardError(f"{path}: missing or unreadable (the manifest lists it): {e}") from None
        got = files_digest(files)
    elif not path.exists():
        raise DamagedShardError(f"{path}: missing (the manifest lists it)")
    else:
        got, files = read_tree(path)
    if digest is not None and got != digest:
        raise DamagedShardError(checksum_mismatch(path, got, digest))
    return files


# ---------------------------------------------------------------------------------------------------
# webdataset: {id}.json + {id}.safetensors per entry, in a plain tar
# ---------------------------------------------------------------------------------------------------
class WebDatasetFormat:
    name, suffix = "webdataset", ".tar"

    def write(self, path: Path, entries: Sequence[Entry]) -> None:
        from safetensors.torch import save

        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for e in entries:
                meta, tensors = e.to_record()
                for ext, blob in (("json", json.dumps(meta).encode()), ("safetensors", save(tensors))):
                    info = tarfile.TarInfo(f"{e.entry_id}.{ext}")
                    info.size, info.mtime, info.mode = len(blob), 0, 0o644  # mtime 0: same bytes on re-run
                    tar.addfile(info, io.BytesIO(blob))

    def read(self, path: Path | Remote, digest: str | None = None) -> Iterator[Entry]:
        from safetensors.torch import load

        data = shard_bytes(path, digest).get("")
        if data is None:
            raise SchemaError(f"{path}: a webdataset shard is a tar file, not a folder")
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                pending: dict[str, dict[str, bytes]] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    data = tar.extractfile(member)
                    if data is None or ext not in ("json", "safetensors"):
                        raise SchemaError(f"{path}: unexpected member {member.name!r}")
                    pending.setdefault(key, {})[ext] = data.read()
                    if len(pending[key]) == 2:
                        parts = pending.pop(key)
                        yield Entry.from_record(json.loads(parts["json"]), load(parts["safetensors"]), f"{path}:{key}")
                if pending:
                    raise SchemaError(f"{path}: incomplete entries {sorted(pending)}")
        except (tarfile.TarError, EOFError, OSError, json.JSONDecodeError) as e:
            raise SchemaError(f"{path}: damaged webdataset shard ({e})") from None


# ---------------------------------------------------------------------------------------------------
# zarr v3: one group per shard, one sub-group per entry, one array per tensor
# ---------------------------------------------------------------------------------------------------
class ZarrFormat:
    name, suffix = "zarr", ".zarr"

    def write(self, path: Path, entries: Sequence[Entry]) -> None:
        import zarr

        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        for e in entries:
            meta, tensors = e.to_record()
            group = root.create_group(e.entry_id)
            dtypes = {}
            for name, t in tensors.items():
                dtypes[name] = str(t.dtype).removeprefix("torch.")
                arr = (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).cpu().numpy()
                chunks = tuple(max(1, s) for s in arr.shape)  # all-zero chunks too: an absent chunk is damage
                group.create_array(name, data=arr, chunks=chunks, config={"write_empty_chunks": True})
            group.attrs.update({"meta": meta, "dtypes": dtypes, "order": len(root.attrs.get("entries", []))})
            root.attrs["entries"] = [*root.attrs.get("entries", []), e.entry_id]

    def read(self, path: Path | Remote, digest: str | None = None) -> Iterator[Entry]:
        import zarr
        from zarr.core.buffer import default_buffer_prototype
        from zarr.storage import MemoryStore

        if isinstance(path, Remote) and not path.location.folders:
            raise SchemaError(f"{path}: a zarr shard is a folder, which a pipe: URL cannot read (one stream: "
                              "webdataset shards only); read zarr by path, file://, s3:// or gs://")  # fmt: skip
        files = shard_bytes(path, digest)
        to_buffer = default_buffer_prototype().buffer.from_bytes
        store = MemoryStore({k: to_buffer(v) for k, v in files.items()}, read_only=True)
        try:
            root = zarr.open_group(store, mode="r", zarr_format=3)
            ids = list(root.attrs["entries"])
        except Exception as e:  # zarr raises several types for missing/corrupt metadata
            raise SchemaError(f"{path}: damaged zarr shard ({type(e).__name__}: {e})") from None
        for key in ids:
            try:
                group = root[key]
                attrs = dict(group.attrs)
                tensors = {}
                for name, dtype in attrs["dtypes"].items():
                    array = group[name]
                    absent = None if digest is not None else _absent_chunk(array, files)
                    if absent is not None:
                        raise DamagedShardError(f"{path}: chunk {absent} is missing (deleted?): zarr would read "
                                                "it as zeros")  # fmt: skip
                    t = torch.from_numpy(np.asarray(array[...]).copy())
                    tensors[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
            except SchemaError:
                raise
            except Exception as e:
                raise SchemaError(f"{path}:{key}: damaged zarr entry ({type(e).__name__}: {e})") from None
            yield Entry.from_record(attrs["meta"], tensors, f"{path}:{key}")


def _absent_chunk(array, files: dict[str, bytes]) -> str | None:
    """The store key of the first chunk of `array` the shard's files lack, or None."""
    for index in itertools.product(*(range(n) for n in array.cdata_shape)):
        key = f"{array.path}/{array.metadata.encode_chunk_key(index)}"
        if key not in files:
            return key
    return None


# shard formats by name (plug-ins: entry-point group ``streamalign.formats``, see streamalign/registry.py)
FORMATS: Registry[ShardFormat] = Registry("formats", "buffer format")
FORMATS.register("webdataset", WebDatasetFormat())
FORMATS.register("zarr", ZarrFormat())


def register_format(name: str, fmt: ShardFormat) -> ShardFormat:
    """Make `fmt` selectable as ``--format NAME`` (its ``suffix`` must differ from every other format's)."""
    if any(f.suffix == fmt.suffix for n, f in FORMATS.items() if n != name):
        raise ValueError(f"buffer format {name!r}: suffix {fmt.suffix!r} is taken by another format")
    return FORMATS.register(name, fmt)


def get_format(name: str) -> ShardFormat:
    return FORMATS.get(name)


# a config field naming a registered format (a registered backend is accepted, and listed in --help)
FormatName = Annotated[str, AfterValidator(lambda name: get_format(name) and name),
                       WithJsonSchema({"enum": FORMATS.names()})]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# atomic shard files and checksums
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardInfo:
    path: Path
    format: str
    entries: int
    bytes: int
    checksum: str


def write_shard(fmt: ShardFormat, path: str | Path, entries: Sequence[Entry]) -> ShardInfo:
    """Write `entries` as one shard at `path`, visible only once complete; returns its checksum."""
    path = Path(path)
    for e in entries:
        if not ENTRY_ID.match(e.entry_id):
            raise SchemaError(f"entry id {e.entry_id!r} must use only letters, digits, '_' and '-'")
    with atomic_path(path, overwrite=False) as tmp:
        fmt.write(tmp, entries)
        digest, size = checksum(tmp), tree_bytes(tmp)
    return ShardInfo(path, fmt.name, len(entries), size, digest)
