"""The parquet manifest: one row per branch of every stored fork group, one part file per shard.

A part ``manifest/<shard name>.parquet`` is written (atomically) right after its shard is finalized, so
every manifest row points at a complete shard whose checksum it records. ``read_manifest`` is the union
of the parts, checked against the integrity record of their collection; it is what ``stats`` queries and
what the reader filters and re-weights with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..io.files import atomic_path, write_atomic
from ..rewards.registry import composite
from ..schemas.buffer import Entry
from .formats import ShardInfo
from .integrity import checked_manifest
from .parts import MANIFEST_DIR
from .urls import INDEX


def manifest_rows(entries: Sequence[Entry], shard: ShardInfo) -> list[dict]:
    """One dict per branch: identity, geometry, the latents' dtype and the prompt embedding's hash, every
    reward as ``reward_<name>``, the composite under the weights in force at collection, and the shard's
    name, format and checksum."""
    rows = []
    for e in entries:
        total = composite(e.rewards, e.reward_weights, torch.float64).tolist()
        for b in range(e.group_size):
            row = {
                "entry_id": e.entry_id,
                "shard": shard.path.name,
                "format": shard.format,
                "checksum": shard.checksum,
                "run_id": e.run_id,
                "policy_id": e.policy_id,
                "seed": e.seed,
                "prompt": e.prompt,
                "prompt_id": e.prompt_id,
                "config_name": e.config_name,
                "num_chunks": e.num_chunks,
                "pivot": e.pivot,
                "group_size": e.group_size,
                "strength": e.strength,
                "store_dtype": str(e.dtype).removeprefix("torch."),
                "text_hash": e.text_hash,
                "branch": b,
            }
            row.update({f"reward_{k}": float(v[b]) for k, v in e.rewards.items()})
            row["composite"] = total[b]
            rows.append(row)
    return rows


def write_manifest_part(
    buffer_dir: str | Path, entries: Sequence[Entry], shard: ShardInfo, extra: dict | None = None
) -> Path:
    """Write the shard's manifest part atomically (temp, fsync, rename); `extra` goes, as JSON values, into
    the parquet metadata (e.g. the groups rejected while collecting the shard)."""
    path = Path(buffer_dir) / MANIFEST_DIR / f"{shard.path.name}.parquet"
    table = pa.Table.from_pylist(manifest_rows(entries, shard))
    meta = {k.encode(): json.dumps(v).encode() for k, v in (extra or {}).items()}
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    return path


def write_index(buffer_dir: str | Path) -> Path:
    """List the manifest folder's files in its ``index.txt`` (atomically): how a ``pipe:`` URL, which
    cannot list a folder, finds the manifest parts and collection records."""
    folder = Path(buffer_dir) / MANIFEST_DIR
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".parquet", ".json"))
    return write_atomic(folder / INDEX, "".join(f"{n}\n" for n in names))


def read_manifest(buffer_dir: str | Path, prefix: str | None = None) -> pa.Table:
    """Union of the manifest parts (of the collection of shard-name `prefix`, or of all; reward columns
    missing from a collection are null), each part checked against the buffer's integrity record first
    (:mod:`streamalign.buffer.integrity`); `buffer_dir` is the buffer's path or URL
    (:mod:`streamalign.buffer.urls`)."""
    return checked_manifest(buffer_dir, prefix).table
