"""`buffer info`, `buffer verify` and `buffer seal`: what a buffer holds; whether every part and shard is
what its integrity record says and every recorded collection is complete; the record of an older buffer."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ..schemas.buffer import SCHEMA_VERSION
from ..schemas.run import RunConfig, arg
from .formats import get_format
from .integrity import SEAL, ShardRecord, checked_manifest, sha256
from .parts import MANIFEST_DIR, manifest_parts, read_part
from .urls import location
from .verify import seal_buffer, verify_buffer


def entry_bytes(folder: str | Path, shard: str, rec: ShardRecord) -> dict[str, int]:
    """Tensor bytes of one entry (the first of `shard`, read against its record) by field, and their total
    (``entry``)."""
    first = next(iter(get_format(rec.format).read(location(folder).shard(shard), rec.checksum)))
    _, tensors = first.to_record()
    out: dict[str, int] = {}
    for name, t in tensors.items():
        key = name.split(".")[0] if name.startswith(("reward.", "kv.")) else name
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return {**out, "entry": sum(out.values())}


def integrity_summary(folder: str | Path) -> dict:
    """How many collections have an integrity record, and the sha256 of those records together (compare
    it with a copy's, or keep it elsewhere: an edit of a record changes it)."""
    where = location(folder)
    rels = [f"{MANIFEST_DIR}/{n}" for n in where.list(MANIFEST_DIR, SEAL)]
    digest = hashlib.sha256(b"".join(sha256(where.read(rel)).encode() for rel in rels)).hexdigest()
    return {"records": len(rels), "sha256": digest}


def buffer_info(folder: str | Path) -> dict:
    """Counts, sizes (on disk per group, and the tensor bytes of one entry by field), formats, the latents'
    stored dtype, policies, configs, reward columns, rejected groups and integrity records of a buffer (a
    path or URL), from its manifest checked against those records."""
    checked = checked_manifest(folder)
    rows = checked.table.to_pylist()
    shards = sorted({r["shard"] for r in rows})
    rejected = 0
    for part in manifest_parts(folder):
        rejected += len(json.loads((read_part(folder, part, schema_only=True).metadata or {}).get(b"rejected", b"[]")))
    groups = {r["entry_id"]: r for r in rows}
    where = location(folder)
    size = sum(where.size(s) for s in shards if where.exists(s))
    return {
        "schema_version": SCHEMA_VERSION,
        "groups": len(groups),
        "branches": len(rows),
        "shards": len(shards),
        "bytes": size,
        "bytes_per_group": size / max(1, len(groups)),
        "rejected_groups": rejected,
        "integrity": integrity_summary(folder),
        "entry_bytes": entry_bytes(folder, rows[0]["shard"], checked.shards[rows[0]["shard"]]) if rows else {},
        "formats": dict(Counter(r["format"] for r in groups.values())),
        "store_dtypes": dict(Counter(r.get("store_dtype") or "unrecorded" for r in groups.values())),
        "policies": dict(Counter(r["policy_id"] for r in groups.values())),
        "configs": dict(Counter(r["config_name"] for r in groups.values())),
        "group_sizes": dict(Counter(r["group_size"] for r in groups.values())),
        "pivots": dict(sorted(Counter(r["pivot"] for r in groups.values()).items())),
        "rewards": [c.removeprefix("reward_") for c in (rows[0] if rows else {}) if c.startswith("reward_")],
        "reward_means": {
            c: sum(r[c] for r in rows if r[c] is not None) / max(1, sum(r[c] is not None for r in rows))
            for c in (rows[0] if rows else {})
            if c.startswith("reward_") or c == "composite"
        },
    }


class BufferRun(RunConfig):
    """Counts, sizes, schema, formats, policies, pivots and reward means of a buffer."""

    folder: str = arg(..., "Buffer folder.", argument=True)


class SealRun(BufferRun):
    """Write the integrity record of an older buffer's finished collections, after checking every shard."""


class VerifyRun(BufferRun):
    """Check every shard against the manifest's checksums and every recorded collection for completeness;
    exit 1 on any damage or an interrupted collection."""

    deep: bool = arg(False, "Also decode and validate every entry.")


def info_stage(cfg: BufferRun) -> str:
    return json.dumps(buffer_info(cfg.folder), indent=1)


def seal_stage(cfg: SealRun) -> str:
    return seal_buffer(cfg.folder)


def verify_stage(cfg: VerifyRun) -> tuple[str, int]:
    """The report's lines and the exit code (1 on any damage, an incomplete collection or unsealed parts)."""
    report = verify_buffer(cfg.folder, deep=cfg.deep)
    lines = [*(f"DAMAGED {p}" for p in report.problems), *(f"INCOMPLETE {p}" for p in report.incomplete),
             *(f"UNSEALED {p}" for p in report.unsealed),
             f"{report.checked} shards checked, {len(report.problems)} problem(s)"
             + (f", {len(report.incomplete)} incomplete collection(s)" if report.incomplete else "")]  # fmt: skip
    return "\n".join(lines), 0 if report.ok else 1
