"""`buffer info` and `buffer verify`: what a buffer holds, whether every shard is intact, and whether
every recorded collection is complete."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..io.files import checksum
from ..schemas.buffer import SCHEMA_VERSION, SchemaError
from ..schemas.run import RunConfig, arg
from .collection import collections
from .formats import FORMATS, checksum_mismatch, get_format
from .manifest import MANIFEST_DIR, manifest_parts, read_manifest, read_part
from .urls import local_folder, location


def entry_bytes(folder: str | Path, shard: str, fmt: str) -> dict[str, int]:
    """Tensor bytes of one entry (the first of `shard`) by field, and their total (``entry``)."""
    first = next(iter(get_format(fmt).read(location(folder).shard(shard))))
    _, tensors = first.to_record()
    out: dict[str, int] = {}
    for name, t in tensors.items():
        key = name.split(".")[0] if name.startswith(("reward.", "kv.")) else name
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return {**out, "entry": sum(out.values())}


def buffer_info(folder: str | Path) -> dict:
    """Counts, sizes (on disk per group, and the tensor bytes of one entry by field), formats, the latents'
    stored dtype, policies, configs, reward columns and rejected groups of a buffer (a path or URL)."""
    rows = read_manifest(folder).to_pylist()
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
        "entry_bytes": entry_bytes(folder, rows[0]["shard"], rows[0]["format"]) if rows else {},
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


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # collections with planned shards not yet written

    @property
    def ok(self) -> bool:
        return not self.problems and not self.incomplete


def verify_buffer(folder: str | Path, deep: bool = False) -> VerifyReport:
    """Check every manifest row's shard exists with the recorded checksum; report shards no manifest part
    accounts for, leftover temporaries, and recorded collections whose planned shards are not all written;
    with `deep`, also decode and validate every entry (in the same read as the checksum)."""
    folder = local_folder(folder, "buffer verify", "through other URLs the reader verifies each shard's "
                          "checksum as it reads it (train), or verify where the buffer was written")
    report = VerifyReport()
    for rec in collections(folder):
        names = rec.shard_names()
        done = sum((folder / MANIFEST_DIR / f"{n}.parquet").exists() for n in names)
        if done < len(names):
            what = f"collection {rec.prefix.rstrip('-')}" if rec.prefix else "the collection"
            report.incomplete.append(f"{what}: {done} of {len(names)} shards written (target {rec.groups} "
                                     "groups): interrupted; re-run the same collect command to finish it")  # fmt: skip
    if report.incomplete and not list((folder / MANIFEST_DIR).glob("*.parquet")):
        return report  # nothing finished yet: no manifest to check
    table = read_manifest(folder)
    expected: dict[str, tuple[str, str]] = {}
    groups: dict[str, set[str]] = {}
    for r in table.select(["shard", "checksum", "format", "entry_id"]).to_pylist():
        expected[r["shard"]] = (r["checksum"], r["format"])
        groups.setdefault(r["shard"], set()).add(r["entry_id"])
    for name, (digest, fmt) in sorted(expected.items()):
        path = folder / name
        report.checked += 1
        if not path.exists():
            report.problems.append(f"{name}: missing (the manifest lists it)")
            continue
        if not deep:
            got = checksum(path)
            if got != digest:
                report.problems.append(checksum_mismatch(name, got, digest))
            continue
        try:
            n = sum(1 for _ in get_format(fmt).read(path, digest))
        except SchemaError as e:
            report.problems.append(str(e).replace(str(path), name, 1))
            continue
        if n != len(groups[name]):
            report.problems.append(f"{name}: holds {n} entries, the manifest lists {len(groups[name])}")
    suffixes = tuple(f.suffix for f in FORMATS.values())
    for path in sorted(folder.glob("shard-*")):
        if path.name.endswith(suffixes) and path.name not in expected:
            report.problems.append(f"{path.name}: not in the manifest (collection interrupted? re-run collect)")
    for path in sorted([*folder.glob(".*.tmp-*"), *(folder / MANIFEST_DIR).glob(".*.tmp-*")]):
        report.problems.append(f"{path.name}: temporary of an interrupted run (re-run collect to clean up)")
    return report


class BufferRun(RunConfig):
    """Counts, sizes, schema, formats, policies, pivots and reward means of a buffer."""

    folder: str = arg(..., "Buffer folder.", argument=True)


class VerifyRun(BufferRun):
    """Check every shard against the manifest's checksums and every recorded collection for completeness;
    exit 1 on any damage or an interrupted collection."""

    deep: bool = arg(False, "Also decode and validate every entry.")


def info_stage(cfg: BufferRun) -> str:
    return json.dumps(buffer_info(cfg.folder), indent=1)


def verify_stage(cfg: VerifyRun) -> tuple[str, int]:
    """The report's lines and the exit code (1 on any damage or an incomplete collection)."""
    report = verify_buffer(cfg.folder, deep=cfg.deep)
    lines = [*(f"DAMAGED {p}" for p in report.problems), *(f"INCOMPLETE {p}" for p in report.incomplete),
             f"{report.checked} shards checked, {len(report.problems)} problem(s)"
             + (f", {len(report.incomplete)} incomplete collection(s)" if report.incomplete else "")]  # fmt: skip
    return "\n".join(lines), 0 if report.ok else 1
