"""The integrity record: what each finished collection holds, so that no edit of the manifest can switch
its checks off.

When a collection is complete, ``collect`` writes ``manifest/<prefix>integrity.json`` (atomically, after
every shard and manifest part): every shard with its format, size in bytes, checksum and entry count, and
every manifest part with its row count, columns (name -> Arrow type) and sha256. Every reader of the
manifest (``train``, ``buffer info``, ``stats``) checks the parts against it before using a row, and takes
each shard's checksum from it:

- a part that is missing, whose bytes differ (a column dropped or retyped, rows deleted or edited), or that
  no record lists is a one-line error naming the part and what differs, never a null;
- a record that lists other shards than its collection's plan (``collection.json``) is an error too;
- a shard name is a plain file name of the form ``shard-<prefix>NNNNNN<format suffix>``, so it can only
  name a file or folder inside the buffer (or under its URL).

A collection without a record (interrupted, or from before records) is not read: re-running the same
``collect`` finishes and records it; ``buffer seal`` records the finished collections of an older buffer
after checking every shard against its part (``seal_buffer``). ``buffer verify`` checks a partial
collection's parts on their own (:func:`check_part`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..io.files import atomic_path, files_digest
from ..schemas.buffer import SchemaError
from .collection import Collection, collections
from .formats import FORMATS
from .parts import MANIFEST_DIR, manifest_parts
from .urls import location

SEAL = "integrity.json"
SEAL_VERSION = 1
SHARD_NAME = re.compile(r"shard-(?P<prefix>(?:[A-Za-z0-9_-]*[A-Za-z_-])?)\d{6,}(?P<suffix>\.[a-z]+)")
HEX64 = re.compile(r"[0-9a-f]{64}")
# the columns every row must hold, and their types: what the readers and `train` use
KEY_COLUMNS = {"entry_id": pa.string(), "shard": pa.string(), "format": pa.string(), "checksum": pa.string(),
               "run_id": pa.string(), "config_name": pa.string(), "group_size": pa.int64(), "branch": pa.int64(),
               "composite": pa.float64()}  # fmt: skip
FIX = "restore it from a copy, or delete the part and its shard and re-run the collect command"


class IntegrityError(SchemaError):
    """A manifest part or integrity record differs from what the buffer recorded (or there is no record)."""


@dataclass(frozen=True)
class ShardRecord:
    format: str
    bytes: int
    checksum: str
    entries: int


@dataclass(frozen=True)
class PartRecord:
    rows: int
    sha256: str
    columns: dict[str, str]


@dataclass
class Seal:
    """The integrity record of one collection (shard-name prefix). `groups`: the plan's target when it was
    sealed (None: an older buffer sealed by ``buffer seal`` without a plan)."""

    prefix: str
    groups: int | None
    shards: dict[str, ShardRecord]
    parts: dict[str, PartRecord]

    def to_json(self) -> str:
        return json.dumps({"version": SEAL_VERSION, **asdict(self)}, indent=1, sort_keys=True)


def part_of(shard: str) -> str:
    """The manifest part of a shard, relative to the buffer root."""
    return f"{MANIFEST_DIR}/{shard}.parquet"


def shard_of(part: str) -> str:
    """The shard a manifest part (its path relative to the buffer root) describes."""
    return part.removeprefix(f"{MANIFEST_DIR}/").removesuffix(".parquet")


def seal_path(prefix: str = "") -> str:
    return f"{MANIFEST_DIR}/{prefix}{SEAL}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_shard_name(name: object, where: str) -> str:
    """`name` when it is a shard name (``shard-<prefix>NNNNNN.<suffix>`` of a known format: a plain file
    name, so never a path outside the buffer); IntegrityError otherwise."""
    m = SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None or m["suffix"] not in {f.suffix for f in FORMATS.values()}:
        raise IntegrityError(f"{where}: shard name {name!r} is not a shard file name inside the buffer "
                             f"(shard-NNNNNN.tar or .zarr): edited? {FIX}")  # fmt: skip
    return name


def format_of(name: str) -> str:
    """The format whose suffix a (checked) shard name carries."""
    suffix = SHARD_NAME.fullmatch(name)["suffix"]
    return next(n for n, f in FORMATS.items() if f.suffix == suffix)


def parse_part(data: bytes, where: str) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise IntegrityError(f"{where}: not a readable parquet file ({str(e).splitlines()[0][:120]}): {FIX}") from None


def describe_part(table: pa.Table, data: bytes) -> PartRecord:
    return PartRecord(table.num_rows, sha256(data), {f.name: str(f.type) for f in table.schema})


# ---------------------------------------------------------------------------------------------------
# one part on its own: the structure every row must have
# ---------------------------------------------------------------------------------------------------
def check_part(table: pa.Table, rel: str, shard: str) -> tuple[str | None, dict[str, int]]:
    """(the shard's checksum, {entry id: branches}) of the manifest part `rel` of `shard`, checked on its
    own: every key column present with its type and no nulls, every row naming this shard, its format and
    one checksum, and each entry's branches 0..G-1 once each. An empty part (every group rejected) has no
    columns: (None, {})."""
    if table.num_rows == 0:
        return None, {}
    for col, typ in KEY_COLUMNS.items():
        if col not in table.column_names:
            raise IntegrityError(f"{rel}: lacks the column {col!r} (dropped?): {FIX}")
        got = table.schema.field(col).type
        if got != typ:
            raise IntegrityError(f"{rel}: column {col!r} is {got}, not {typ} (retyped?): {FIX}")
        if table.column(col).null_count:
            raise IntegrityError(f"{rel}: column {col!r} holds {table.column(col).null_count} null(s): {FIX}")
    rows = table.select(["entry_id", "shard", "format", "checksum", "group_size", "branch"]).to_pylist()
    names = {r["shard"] for r in rows}
    if names != {shard}:
        raise IntegrityError(f"{rel}: rows name the shard(s) {sorted(names)}, the part is {shard}'s (edited?): {FIX}")
    fmts, digests = {r["format"] for r in rows}, {r["checksum"] for r in rows}
    if fmts != {format_of(shard)}:
        raise IntegrityError(f"{rel}: rows give the format(s) {sorted(fmts)} for {shard} (edited?): {FIX}")
    if len(digests) != 1 or not HEX64.fullmatch(next(iter(digests))):
        raise IntegrityError(f"{rel}: rows give {len(digests)} checksums for {shard}, or not a sha256: {FIX}")
    branches: dict[str, list[int]] = {}
    sizes: dict[str, int] = {}
    for r in rows:
        branches.setdefault(r["entry_id"], []).append(r["branch"])
        sizes[r["entry_id"]] = r["group_size"]
    for entry, got in branches.items():
        if sorted(got) != list(range(sizes[entry])):
            raise IntegrityError(f"{rel}: entry {entry} has branches {sorted(got)}, its group size is "
                                 f"{sizes[entry]} (rows deleted?): {FIX}")  # fmt: skip
    return next(iter(digests)), sizes


def part_problem(rel: str, data: bytes, rec: PartRecord) -> str | None:
    """What differs between the part's bytes and its record (None: the same sha256)."""
    got = sha256(data)
    if got == rec.sha256:
        return None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError):
        what = ["not a readable parquet file"]
    else:
        cols = {f.name: str(f.type) for f in table.schema}
        lost, added = [c for c in rec.columns if c not in cols], [c for c in cols if c not in rec.columns]
        what = [f"lacks the column(s) {', '.join(lost)}"] if lost else []
        what += [f"column {c} is {cols[c]}, recorded {t}" for c, t in rec.columns.items() if cols.get(c, t) != t]
        what += [f"holds {table.num_rows} rows, the record lists {rec.rows}"] if table.num_rows != rec.rows else []
        what += [f"has the column(s) {', '.join(added)} the record lacks"] if added else []
    reason = "; ".join(what) or "its values differ"
    return f"{rel}: {reason} (sha256 {got[:12]}... != integrity record {rec.sha256[:12]}...): {FIX}"


# ---------------------------------------------------------------------------------------------------
# the records
# ---------------------------------------------------------------------------------------------------
def parse_seal(data: bytes, where: str) -> Seal:
    """A record read back, checked for shape: every shard name valid and with its part, and back."""
    try:
        raw = json.loads(data)
        if raw.pop("version") != SEAL_VERSION:
            raise ValueError("unknown version")
        seal = Seal(raw["prefix"], raw["groups"], {k: ShardRecord(**v) for k, v in raw["shards"].items()},
                    {k: PartRecord(**v) for k, v in raw["parts"].items()})  # fmt: skip
        ok = all(HEX64.fullmatch(s.checksum) and s.bytes >= 0 and s.entries >= 0 for s in seal.shards.values())
        ok = ok and all(HEX64.fullmatch(p.sha256) and p.rows >= 0 for p in seal.parts.values())
        if not ok or not isinstance(seal.prefix, str):
            raise ValueError("a value out of range")
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise IntegrityError(f"integrity record {where} is damaged ({type(e).__name__}: {e}): restore it from a "
                             "copy, or delete it and re-run the collect command") from None  # fmt: skip
    for name in seal.shards:
        check_shard_name(name, where)
    own = {SHARD_NAME.fullmatch(n)["prefix"] for n in seal.shards} <= {seal.prefix}
    if not own or not str(where).endswith(f"/{seal.prefix}{SEAL}"):
        raise IntegrityError(f"integrity record {where} is damaged (of collection {seal.prefix!r}, or listing another "
                             "collection's shards): restore it from a copy")  # fmt: skip
    if {part_of(n) for n in seal.shards} != set(seal.parts):
        raise IntegrityError(f"integrity record {where} is damaged (its shards and parts differ): restore it from a "
                             "copy, or delete it and re-run the collect command")  # fmt: skip
    return seal


def read_seals(buffer: str | Path) -> list[Seal]:
    """Every integrity record of a buffer (a path or URL)."""
    where = location(buffer)
    rels = [f"{MANIFEST_DIR}/{n}" for n in where.list(MANIFEST_DIR, SEAL)]
    return [parse_seal(where.read(rel), f"{where.name}/{rel}") for rel in rels]


def read_seal(folder: Path, prefix: str) -> Seal | None:
    path = Path(folder) / seal_path(prefix)
    return parse_seal(path.read_bytes(), str(path)) if path.exists() else None


def finished(seal: Seal | None, plan: Collection | None) -> bool:
    """Whether `seal` records the whole of its collection's plan (always, without a plan)."""
    return seal is not None and (plan is None or seal.groups == plan.groups)


def _what(prefix: str) -> str:
    return f"collection {prefix.rstrip('-')}" if prefix else "the collection"


def unsealed_message(buffer: str | Path, prefix: str, plan: Collection | None, written: int) -> str:
    """Why the manifest parts of `prefix` are not read, and what to do."""
    if plan is None:
        return (f"buffer {buffer}: {written} manifest part(s) of {_what(prefix)} are in no integrity record (a buffer "
                f"from before integrity records, or parts added by hand): run `streamalign buffer seal {buffer}` "
                "(it checks every shard first), or re-run the collect command that wrote it")  # fmt: skip
    n = len(plan.shard_names())
    if written < n:
        return (f"buffer {buffer}: {_what(prefix)} is unfinished ({written} of {n} shards written, no integrity "
                "record): interrupted; re-run the same collect command to finish it")  # fmt: skip
    return (f"buffer {buffer}: {_what(prefix)} has all {n} shards but no integrity record (interrupted at its end, "
            f"or written before integrity records): re-run the same collect command, or run `streamalign buffer seal "
            f"{buffer}`")  # fmt: skip


def plan_problem(seal: Seal, plan: Collection | None) -> str | None:
    """How a collection's record contradicts its plan (None: it does not; a record of fewer groups is
    that of a collection being extended)."""
    if plan is None or seal.groups is None or seal.groups < plan.groups:
        return None
    if seal.groups > plan.groups:
        return (f"the integrity record of {_what(seal.prefix)} is of {seal.groups} groups, its plan of {plan.groups} "
                "(edited?): restore collection.json and the record from a copy")  # fmt: skip
    planned = set(plan.shard_names())
    if set(seal.shards) != planned:
        lost = sorted(planned - set(seal.shards)) + sorted(set(seal.shards) - planned)
        return (f"the integrity record of {_what(seal.prefix)} lists {len(seal.shards)} shards, its plan "
                f"{len(planned)} ({', '.join(lost[:3])} differ; edited?): restore the record from a copy")  # fmt: skip
    return None


def part_prefix(rel: str) -> str:
    """The shard-name prefix (the collection) of a manifest part's path."""
    m = SHARD_NAME.fullmatch(shard_of(rel))
    return m["prefix"] if m else ""


# ---------------------------------------------------------------------------------------------------
# the checked manifest: what every reader uses
# ---------------------------------------------------------------------------------------------------
@dataclass
class CheckedManifest:
    """The manifest rows of a buffer's sealed collections, and the record of each of their shards."""

    table: pa.Table
    shards: dict[str, ShardRecord]


def checked_manifest(buffer: str | Path, prefix: str | None = None) -> CheckedManifest:
    """The union of the manifest parts (of the collection `prefix`, or of all), each checked against its
    integrity record before any row is used (IntegrityError naming the first difference)."""
    where = location(buffer)
    parts = manifest_parts(buffer)
    seals, plans = read_seals(buffer), {p.prefix: p for p in collections(buffer)}
    if prefix is not None:
        seals = [s for s in seals if s.prefix == prefix]
        parts = [p for p in parts if part_prefix(p) == prefix]
        plans = {k: v for k, v in plans.items() if k == prefix}
    if not parts and not seals:
        raise FileNotFoundError(f"no manifest in {buffer}: not a streamalign buffer, or an empty one")
    for seal in seals:
        problem = plan_problem(seal, plans.get(seal.prefix))
        if problem is not None:
            raise IntegrityError(f"buffer {buffer}: {problem}")
    by_prefix = {s.prefix: s for s in seals}
    for key, plan in sorted(plans.items()):
        if not finished(by_prefix.get(key), plan):
            written = sum(where.exists(part_of(n)) for n in plan.shard_names())
            raise IntegrityError(unsealed_message(buffer, key, plan, written))
    listed = {rel: rec for s in seals for rel, rec in s.parts.items()}
    loose = [p for p in parts if p not in listed]
    if loose:
        key = part_prefix(loose[0])
        raise IntegrityError(unsealed_message(buffer, key, None, sum(part_prefix(p) == key for p in loose)))
    tables = []
    for rel, rec in sorted(listed.items()):
        try:
            data = where.read(rel)
        except FileNotFoundError:
            raise IntegrityError(f"buffer {buffer}: {rel} is missing (the integrity record lists it): {FIX}") from None
        problem = part_problem(rel, data, rec)
        if problem is not None:
            raise IntegrityError(f"buffer {buffer}: {problem}")
        table = parse_part(data, f"{where.name}/{rel}")
        problem = record_problem(rel, table, data, rec, next(s.shards[shard_of(rel)] for s in seals if rel in s.parts))
        if problem is not None:
            raise IntegrityError(f"buffer {buffer}: {problem}")
        tables.append(table)
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    return CheckedManifest(table, {n: r for s in seals for n, r in s.shards.items()})


def record_problem(rel: str, table: pa.Table, data: bytes, rec: PartRecord, shard: ShardRecord) -> str | None:
    """How the record of a part whose sha256 matched disagrees with it (its rows, columns, shard, format,
    checksum or entry count; a record edited by hand), or None."""
    name = shard_of(rel)
    agrees = describe_part(table, data) == rec and shard.format == format_of(name)
    if agrees and table.num_rows == 0:
        agrees = shard.entries == 0
    elif agrees:
        agrees = (set(table.column("shard").to_pylist()) == {name}
                  and set(table.column("checksum").to_pylist()) == {shard.checksum}
                  and len(set(table.column("entry_id").to_pylist())) == shard.entries)  # fmt: skip
    if agrees:
        return None
    return (f"the integrity record of {rel} and of its shard disagree with the part (the record edited?): restore "
            "the record from a copy")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# writing records
# ---------------------------------------------------------------------------------------------------
def build_seal(folder: Path, prefix: str, names: Iterable[str], groups: int | None,
               size: Callable[[str], int], digest: Callable[[str], str],
               planned: dict[str, int] | None = None) -> Seal:  # fmt: skip
    """The record of the shards `names` from their manifest parts in `folder` (each checked on its own:
    :func:`check_part`); `size`/`digest` give a shard's bytes and, for an empty part, its checksum;
    `planned`: the entries each shard must hold (its planned groups less those rejected)."""
    shards, parts = {}, {}
    for name in names:
        check_shard_name(name, str(folder))
        rel = part_of(name)
        try:
            data = (folder / rel).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{folder / rel} is missing: the collection is unfinished") from None
        table = parse_part(data, str(folder / rel))
        sum_, entries = check_part(table, rel, name)
        if planned is not None and len(entries) != planned[name]:
            raise IntegrityError(f"{rel}: lists {len(entries)} groups, the plan less rejections {planned[name]} "
                                 f"(rows deleted?): {FIX}")  # fmt: skip
        parts[rel] = describe_part(table, data)
        shards[name] = ShardRecord(format_of(name), size(name), sum_ or digest(name), len(entries))
    return Seal(prefix, groups, shards, parts)


def write_seal(folder: Path, seal: Seal) -> Path:
    path = Path(folder) / seal_path(seal.prefix)
    with atomic_path(path) as tmp:
        tmp.write_text(seal.to_json())
    return path


def planned_entries(folder: Path, plan: Collection) -> dict[str, int]:
    """The entries each planned shard must hold: its groups less those its part records as rejected."""
    out = {}
    for name, (_, lo, hi) in zip(plan.shard_names(), plan.plan(), strict=True):
        meta = pq.read_schema(folder / part_of(name)).metadata or {}
        out[name] = hi - lo - len(json.loads(meta.get(b"rejected", b"[]")))
    return out


def seal_collection(folder: Path, plan: Collection, shards_at: str | Path | None = None) -> Seal:
    """Record a finished collection (what ``collect`` does last): its parts in `folder`, its shards' sizes
    (and an empty shard's checksum) from `shards_at` (the upload URL; default `folder`)."""
    where = location(shards_at if shards_at is not None else folder)
    seal = build_seal(folder, plan.prefix, plan.shard_names(), plan.groups, where.size,
                      lambda n: files_digest(where.tree(n)), planned_entries(folder, plan))  # fmt: skip
    write_seal(folder, seal)
    return seal
