"""Shard storage backends behind one interface: webdataset tar shards and zarr v3 groups.

A shard holds whole entries and is written at once. ``write_shard`` makes it visible only when complete
(temporary sibling, fsync, rename) and returns its sha256 checksum; ``read_shard`` yields validated
entries in the order they were written. No pickle anywhere: tensors travel as safetensors bytes (tar) or
typed zarr arrays (bfloat16 as uint16 with the logical dtype in the attributes).
"""

from __future__ import annotations

import io
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

from ..io.files import atomic_path, checksum, tree_bytes
from ..schemas.buffer import Entry, SchemaError

ENTRY_ID = re.compile(r"^[A-Za-z0-9_-]+$")  # webdataset splits keys at the first dot


class ShardFormat(Protocol):
    name: str
    suffix: str

    def write(self, path: Path, entries: Sequence[Entry]) -> None: ...

    def read(self, path: Path) -> Iterator[Entry]: ...


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

    def read(self, path: Path) -> Iterator[Entry]:
        from safetensors.torch import load

        try:
            with tarfile.open(path, "r") as tar:
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
                chunks = tuple(max(1, s) for s in arr.shape)
                group.create_array(name, data=arr, chunks=chunks)
            group.attrs.update({"meta": meta, "dtypes": dtypes, "order": len(root.attrs.get("entries", []))})
            root.attrs["entries"] = [*root.attrs.get("entries", []), e.entry_id]

    def read(self, path: Path) -> Iterator[Entry]:
        import zarr

        try:
            root = zarr.open_group(str(path), mode="r", zarr_format=3)
            ids = list(root.attrs["entries"])
        except Exception as e:  # zarr raises several types for missing/corrupt metadata
            raise SchemaError(f"{path}: damaged zarr shard ({type(e).__name__}: {e})") from None
        for key in ids:
            try:
                group = root[key]
                attrs = dict(group.attrs)
                tensors = {}
                for name, dtype in attrs["dtypes"].items():
                    t = torch.from_numpy(np.asarray(group[name][...]).copy())
                    tensors[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
            except SchemaError:
                raise
            except Exception as e:
                raise SchemaError(f"{path}:{key}: damaged zarr entry ({type(e).__name__}: {e})") from None
            yield Entry.from_record(attrs["meta"], tensors, f"{path}:{key}")


FORMATS: dict[str, ShardFormat] = {"webdataset": WebDatasetFormat(), "zarr": ZarrFormat()}


def get_format(name: str) -> ShardFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown buffer format {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]


# a config field naming a registered format (a backend added to FORMATS is accepted, and listed in --help)
FormatName = Annotated[str, AfterValidator(lambda name: get_format(name) and name),
                       WithJsonSchema({"enum": list(FORMATS)})]  # fmt: skip


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
