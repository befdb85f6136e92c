"""`buffer verify` and `buffer seal`: whether every manifest part and shard is what its collection's
integrity record says (:mod:`streamalign.buffer.integrity`), every recorded collection complete and every
entry finite; and the record of an older buffer's finished collections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io.files import checksum, tree_bytes
from ..schemas.buffer import SchemaError
from .collection import BufferLock, Collection, collections
from .formats import FORMATS, checksum_mismatch, get_format
from .integrity import (
    SEAL,
    IntegrityError,
    Seal,
    build_seal,
    check_part,
    check_shard_name,
    finished,
    format_of,
    parse_part,
    parse_seal,
    part_of,
    part_prefix,
    part_problem,
    plan_problem,
    planned_entries,
    read_seals,
    record_problem,
    shard_of,
    unsealed_message,
    write_seal,
)
from .manifest import write_index
from .parts import MANIFEST_DIR, manifest_parts
from .urls import local_folder, location


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # collections with planned shards not yet written
    unsealed: list[str] = field(default_factory=list)  # manifest parts no integrity record covers

    @property
    def ok(self) -> bool:
        return not self.problems and not self.incomplete and not self.unsealed


def non_finite(entry) -> list[str]:
    """The tensors of an entry holding NaN or inf values, with their counts."""
    _, tensors = entry.to_record()
    bad = {k: int((~torch.isfinite(t)).sum()) for k, t in tensors.items() if t.is_floating_point()}
    return [f"{k} ({n} value(s))" for k, n in sorted(bad.items()) if n]


def shard_problems(folder: Path, name: str, digest: str | None, entries: dict[str, int], size: int | None,
                   deep: bool) -> list[str]:  # fmt: skip
    """What is wrong with one shard against what its part (and record) say: missing, its size (`size`:
    recorded), its checksum, and with `deep` every entry decoded: its ids, group sizes and finite tensors."""
    path = folder / name
    if not path.exists():
        return [f"{name}: missing (the manifest lists it)"]
    if size is not None and tree_bytes(path) != size:
        return [f"{name}: {tree_bytes(path)} bytes, the integrity record lists {size} (truncated or altered)"]
    if not deep:
        got = checksum(path)
        return [checksum_mismatch(name, got, digest)] if digest is not None and got != digest else []
    seen, out = {}, []
    try:
        for e in get_format(format_of(name)).read(path, digest):
            seen[e.entry_id] = e.group_size
            out += [f"{name}: entry {e.entry_id}: non-finite {t}" for t in non_finite(e)]
    except SchemaError as e:
        return [str(e).replace(str(path), name, 1)]
    if seen != entries:
        out.append(f"{name}: holds {len(seen)} entries, the manifest lists {len(entries)}"
                   + ("" if len(seen) != len(entries) else " (other ids or group sizes)"))  # fmt: skip
    return out


@dataclass
class _Expected:
    """What the manifest says of one shard: its checksum, entries (id -> group size), recorded size."""

    digest: str | None
    entries: dict[str, int]
    size: int | None = None


def _read_parts(folder: Path, report: VerifyReport, rels: list[str], seal: Seal | None) -> dict[str, _Expected]:
    """The shards the parts `rels` describe; each part checked against `seal` (its record) or, without
    one, on its own; its problems go into `report`."""
    out = {}
    for rel in rels:
        shard = shard_of(rel)
        rec = seal.parts.get(rel) if seal is not None else None
        path = folder / rel
        if not path.exists():
            if rec is not None:
                report.problems.append(f"{shard}: its manifest part {rel} is missing (the integrity record lists it)")
                known = seal.shards[shard]
                out[shard] = _Expected(known.checksum, {}, known.bytes)  # still check the shard's bytes
            continue
        data = path.read_bytes()
        try:
            check_shard_name(shard, rel)
            problem = part_problem(rel, data, rec) if rec is not None else None
            if problem is not None:
                raise IntegrityError(problem)
            table = parse_part(data, rel)
            problem = record_problem(rel, table, data, rec, seal.shards[shard]) if rec is not None else None
            if problem is not None:
                raise IntegrityError(problem)
            digest, entries = check_part(table, rel, shard)
        except IntegrityError as e:
            report.problems.append(f"{shard}: {e}")
            continue
        known = seal.shards[shard] if rec is not None else None
        out[shard] = _Expected(known.checksum if known else digest, entries, known.bytes if known else None)
    return out


def verify_buffer(folder: str | Path, deep: bool = False) -> VerifyReport:
    """Check the buffer against its integrity records: every recorded manifest part has its sha256 and
    every recorded shard its size and checksum; the parts of unfinished collections and of older buffers
    are checked on their own (and reported as incomplete or unsealed); shards no part accounts for and
    leftover temporaries are reported. With `deep`, also decode every entry (in the same read as the
    checksum) and flag non-finite tensors."""
    folder = local_folder(folder, "buffer verify", "through other URLs the reader verifies each shard's "
                          "checksum as it reads it (train), or verify where the buffer was written")
    report = VerifyReport()
    plans = {rec.prefix: rec for rec in collections(folder)}
    seals: dict[str, Seal] = {}
    for name in sorted(p.name for p in (folder / MANIFEST_DIR).glob(f"*{SEAL}")):
        try:
            seal = parse_seal((folder / MANIFEST_DIR / name).read_bytes(), f"{MANIFEST_DIR}/{name}")
        except IntegrityError as e:
            report.problems.append(str(e))
            continue
        seals[seal.prefix] = seal
    parts = set(manifest_parts(folder))
    if not plans and not seals and not parts and not report.problems:
        raise FileNotFoundError(f"no manifest in {folder}: not a streamalign buffer, or an empty one")
    expected: dict[str, _Expected] = {}
    for prefix, seal in sorted(seals.items()):
        problem = plan_problem(seal, plans.get(prefix))
        if problem is not None:
            report.problems.append(problem)
        expected.update(_read_parts(folder, report, sorted(seal.parts), seal))
    for prefix, rec in sorted(plans.items()):
        if finished(seals.get(prefix), rec):
            continue
        names = rec.shard_names()
        done = sum(part_of(n) in parts for n in names)
        what = f"collection {prefix.rstrip('-')}" if prefix else "the collection"
        if done < len(names):
            report.incomplete.append(f"{what}: {done} of {len(names)} shards written (target {rec.groups} "
                                     "groups): interrupted; re-run the same collect command to finish it")  # fmt: skip
        else:
            report.incomplete.append(f"{what}: all {len(names)} shards written, no integrity record (interrupted "
                                     "at its end, or written before records): re-run the same collect command, or "
                                     f"run `streamalign buffer seal {folder}`")  # fmt: skip
        new = [part_of(n) for n in names if part_of(n) in parts and part_of(n) not in _listed(seals)]
        expected.update(_read_parts(folder, report, new, None))
    loose = sorted(parts - _listed(seals) - {part_of(n) for p in plans.values() for n in p.shard_names()})
    if loose:
        report.unsealed.append(f"{len(loose)} manifest part(s) in no integrity record ({', '.join(loose[:2])}"
                               f"{', ...' if len(loose) > 2 else ''}): a buffer from before integrity records, or "
                               "parts added by hand: check them (see above), then run `streamalign buffer seal "
                               f"{folder}`")  # fmt: skip
        expected.update(_read_parts(folder, report, loose, None))
    for name, want in sorted(expected.items()):
        report.checked += 1
        report.problems += shard_problems(folder, name, want.digest, want.entries, want.size, deep)
    suffixes = tuple(f.suffix for f in FORMATS.values())
    for path in sorted(folder.glob("shard-*")):
        if path.name.endswith(suffixes) and path.name not in expected and not (folder / part_of(path.name)).exists():
            report.problems.append(f"{path.name}: not in the manifest (collection interrupted? re-run collect)")
    for path in sorted([*folder.glob(".*.tmp-*"), *(folder / MANIFEST_DIR).glob(".*.tmp-*")]):
        report.problems.append(f"{path.name}: temporary of an interrupted run (re-run collect to clean up)")
    return report


def _listed(seals: dict[str, Seal]) -> set[str]:
    return {rel for s in seals.values() for rel in s.parts}


def seal_buffer(folder: str | Path) -> str:
    """``buffer seal``: write the integrity record of every finished collection that has none (a buffer
    from before records), after checking each of its shards deeply against its part; refuse when any
    check fails or a collection is unfinished. Sealed collections are left as they are."""
    folder = local_folder(folder, "buffer seal", "seal the buffer where it was written, then copy it to the store")
    if not (folder / MANIFEST_DIR).is_dir():
        raise FileNotFoundError(f"no manifest in {folder}: not a streamalign buffer")
    with BufferLock(folder):
        plans = {rec.prefix: rec for rec in collections(folder)}
        seals = {s.prefix: s for s in read_seals(folder)}
        parts = set(manifest_parts(folder))
        todo: dict[str, tuple[list[str], Collection | None]] = {}
        for key, plan in sorted(plans.items()):
            if not finished(seals.get(key), plan):
                written = sum(part_of(n) in parts for n in plan.shard_names())
                if written < len(plan.shard_names()):
                    raise ValueError(f"cannot seal: {unsealed_message(folder, key, plan, written).split(': ', 1)[1]} "
                                     "(buffer seal records finished collections only)")  # fmt: skip
                todo[key] = (plan.shard_names(), plan)
        for rel in sorted(parts - _listed(seals)):
            key = part_prefix(rel)
            if key in seals and key not in todo:
                raise ValueError(f"cannot seal {folder}: {rel} is in no integrity record but its collection is "
                                 "sealed (added by hand?): remove it and its shard")  # fmt: skip
            if key not in plans:
                todo.setdefault(key, ([], None))[0].append(shard_of(rel))
        if not todo:
            return f"{folder}: every collection has its integrity record already; nothing to seal"
        report = verify_buffer(folder, deep=True)
        if report.problems:
            raise ValueError(f"cannot seal {folder}: {len(report.problems)} problem(s), the first: "
                             f"{report.problems[0]} (see `streamalign buffer verify --deep`)")  # fmt: skip
        where = location(folder)
        for key, (names, plan) in sorted(todo.items()):
            planned = planned_entries(folder, plan) if plan is not None else None
            seal = build_seal(folder, key, names, plan.groups if plan is not None else None, where.size,
                              lambda n: checksum(folder / n), planned)  # fmt: skip
            write_seal(folder, seal)
        write_index(folder)
    shards = sum(len(names) for names, _ in todo.values())
    return f"sealed {len(todo)} collection(s) of {folder}: {shards} shards checked and recorded"
