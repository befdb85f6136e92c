"""Where a buffer's manifest lives and how its parts are read (a path or URL): the layout the writer
(:mod:`.manifest`), the integrity record (:mod:`.integrity`) and the collection records share."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .urls import location

MANIFEST_DIR = "manifest"


def manifest_parts(buffer: str | Path) -> list[str]:
    """The paths of the manifest parts relative to the buffer root (a path or URL), sorted."""
    return [f"{MANIFEST_DIR}/{name}" for name in location(buffer).list(MANIFEST_DIR, ".parquet")]


def read_part(buffer: str | Path, rel: str, schema_only: bool = False) -> pa.Table | pa.Schema:
    """One manifest part (or only its schema, which holds the part's metadata) of the buffer at a path or URL."""
    data = pa.BufferReader(location(buffer).read(rel))
    try:
        return pq.read_schema(data) if schema_only else pq.read_table(data)
    except pa.ArrowException as e:  # garbage or a truncated file: name it (pyarrow says '<Buffer>')
        raise ValueError(f"manifest part {part_name(buffer, rel)} is not a readable parquet file "
                         f"({str(e).splitlines()[0].split(': ', 1)[-1]}): restore it or re-collect its shard") from None


def part_name(buffer: str | Path, rel: str) -> str:
    """How messages name the manifest part at `rel` of a buffer given by path or URL."""
    return f"{str(buffer).rstrip('/')}/{rel}"
