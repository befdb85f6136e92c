"""Random damage to a small buffer, for the integrity property test: a seeded generator of mutations that
each change bytes that `train` reads (a shard, a manifest part, an integrity record or a plan).

Every mutation is a function ``(buffer folder, random.Random) -> str`` that edits the folder in place and
returns what it did (for the failure message). The edits are made with plain file and pyarrow operations,
never with streamalign's own writers, so a bug there cannot hide one here.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

Mutation = Callable[[Path, random.Random], str]


def _shards(buf: Path) -> list[Path]:
    return sorted(p for p in buf.glob("shard-*") if p.suffix in (".tar", ".zarr"))


def _parts(buf: Path) -> list[Path]:
    return sorted((buf / "manifest").glob("*.parquet"))


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"bit flipped at byte {i} of {path.name}"


def flip_shard_bytes(buf: Path, rng: random.Random) -> str:
    return _flip(rng.choice(_files(rng.choice(_shards(buf)))), rng)


def truncate_shard(buf: Path, rng: random.Random) -> str:
    f = rng.choice(_files(rng.choice(_shards(buf))))
    size = f.stat().st_size
    keep = rng.randrange(size)
    f.write_bytes(f.read_bytes()[:keep])
    return f"{f.relative_to(buf)} truncated to {keep} of {size} bytes"


def delete_shard(buf: Path, rng: random.Random) -> str:
    s = rng.choice(_shards(buf))
    shutil.rmtree(s) if s.is_dir() else s.unlink()
    return f"{s.name} deleted"


def delete_shard_file(buf: Path, rng: random.Random) -> str:
    """One file of a zarr shard (a chunk or metadata), or a whole tar shard."""
    f = rng.choice(_files(rng.choice(_shards(buf))))
    f.unlink()
    return f"{f.relative_to(buf)} deleted"


def add_file_to_shard(buf: Path, rng: random.Random) -> str:
    s = rng.choice(_shards(buf))
    if s.is_file():  # a tar: append bytes after its end
        s.write_bytes(s.read_bytes() + b"\0" * 512 * rng.randint(1, 4))
        return f"{s.name}: zero blocks appended"
    (s / "extra").write_bytes(b"x")
    return f"{s.name}/extra added"


def swap_shards(buf: Path, rng: random.Random) -> str:
    a, b = rng.sample(_shards(buf), 2)
    tmp = a.with_name("swap-tmp")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    return f"{a.name} and {b.name} swapped"


def _rewrite(part: Path, table: pa.Table) -> None:
    """Write `table` as the part, keeping the part's metadata (the rejected groups)."""
    meta = pq.read_schema(part).metadata
    pq.write_table(table.replace_schema_metadata(meta), part)


def flip_part_bytes(buf: Path, rng: random.Random) -> str:
    return _flip(rng.choice(_parts(buf)), rng)


def truncate_part(buf: Path, rng: random.Random) -> str:
    p = rng.choice(_parts(buf))
    keep = rng.randrange(p.stat().st_size)
    p.write_bytes(p.read_bytes()[:keep])
    return f"{p.name} truncated to {keep} bytes"


def delete_part(buf: Path, rng: random.Random) -> str:
    p = rng.choice(_parts(buf))
    p.unlink()
    return f"{p.name} deleted"


def delete_rows(buf: Path, rng: random.Random) -> str:
    p = rng.choice(_parts(buf))
    t = pq.read_table(p)
    gone = sorted(rng.sample(range(t.num_rows), rng.randint(1, t.num_rows)))
    _rewrite(p, t.take(pa.array([i for i in range(t.num_rows) if i not in gone], pa.int64())))
    return f"{p.name}: rows {gone} deleted"


def drop_column(buf: Path, rng: random.Random) -> str:
    p = rng.choice(_parts(buf))
    t = pq.read_table(p)
    col = rng.choice(t.column_names)
    _rewrite(p, t.drop_columns([col]))
    return f"{p.name}: column {col} dropped"


RETYPES = {pa.int64(): [pa.int32(), pa.float64(), pa.string()], pa.float64(): [pa.float32(), pa.string()],
           pa.string(): [pa.large_string(), pa.binary()], pa.bool_(): [pa.int8()]}  # fmt: skip


def retype_column(buf: Path, rng: random.Random) -> str:
    p = rng.choice(_parts(buf))
    t = pq.read_table(p)
    fields = [f for f in t.schema if f.type in RETYPES]
    f = rng.choice(fields)
    to = rng.choice(RETYPES[f.type])
    i = t.column_names.index(f.name)
    _rewrite(p, t.set_column(i, pa.field(f.name, to), t.column(f.name).cast(to)))
    return f"{p.name}: column {f.name} retyped {f.type} -> {to}"


def edit_value(buf: Path, rng: random.Random) -> str:
    """One cell of a reward, composite, pivot or group-size column changed."""
    p = rng.choice(_parts(buf))
    t = pq.read_table(p)
    cols = [c for c in t.column_names if c.startswith("reward_") or c in ("composite", "pivot", "group_size", "seed")]
    col = rng.choice(cols)
    values = t.column(col).to_pylist()
    k = rng.randrange(len(values))
    values[k] = values[k] + 1
    _rewrite(p, t.set_column(t.column_names.index(col), col, pa.array(values, t.schema.field(col).type)))
    return f"{p.name}: {col}[{k}] += 1"


def rewrite_shard_path(buf: Path, rng: random.Random) -> str:
    """The `shard` value of a part's rows pointed elsewhere: an absolute path to a copy outside the buffer,
    a '..' path, a sub-folder, or another shard of the buffer. The copy is a real shard, so a reader that
    followed the path would find valid data there."""
    p = rng.choice(_parts(buf))
    t = pq.read_table(p)
    name = t.column("shard")[0].as_py()
    outside = buf.parent / f"outside-{rng.randrange(10**6)}"
    outside.mkdir()
    src = buf / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, outside / name)
    kind = rng.choice(["absolute", "dotdot", "subfolder", "other"])
    if kind == "absolute":
        target = str(outside / name)
    elif kind == "dotdot":
        target = f"../{outside.name}/{name}"
    elif kind == "subfolder":
        (buf / "sub").mkdir(exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, buf / "sub" / name)
        target = f"sub/{name}"
    else:
        target = rng.choice([s.name for s in _shards(buf) if s.name != name])
    _rewrite(p, t.set_column(t.column_names.index("shard"), "shard", pa.array([target] * t.num_rows)))
    return f"{p.name}: shard -> {target} ({kind})"


def _record(buf: Path) -> tuple[Path, dict]:
    path = buf / "manifest" / "integrity.json"
    return path, json.loads(path.read_text())


def delete_record(buf: Path, rng: random.Random) -> str:
    (buf / "manifest" / "integrity.json").unlink()
    return "integrity.json deleted"


def edit_record(buf: Path, rng: random.Random) -> str:
    """A shard's checksum or a part's sha256 in the record changed, or a shard and its part taken out of
    the record (and out of the buffer: a consistent removal that only the plan can tell)."""
    path, rec = _record(buf)
    kind = rng.choice(["checksum", "sha256", "remove"])
    name = rng.choice(sorted(rec["shards"]))
    part = f"manifest/{name}.parquet"
    if kind == "checksum":
        rec["shards"][name]["checksum"] = f"{int(rec['shards'][name]['checksum'], 16) ^ 1:064x}"
    elif kind == "sha256":
        rec["parts"][part]["sha256"] = f"{int(rec['parts'][part]['sha256'], 16) ^ 1:064x}"
    else:
        del rec["shards"][name], rec["parts"][part]
        (buf / part).unlink()
        s = buf / name
        shutil.rmtree(s) if s.is_dir() else s.unlink()
    path.write_text(json.dumps(rec))
    return f"integrity.json: {kind} of {name}"


def flip_record_bytes(buf: Path, rng: random.Random) -> str:
    return _flip(buf / "manifest" / "integrity.json", rng)


def edit_plan(buf: Path, rng: random.Random) -> str:
    path = buf / "manifest" / "collection.json"
    plan = json.loads(path.read_text())
    plan["groups"] += rng.choice([-1, 1])
    plan["segments"][-1][1] = plan["groups"]
    path.write_text(json.dumps(plan))
    return f"collection.json: groups -> {plan['groups']}"


MUTATIONS: list[Mutation] = [
    flip_shard_bytes, truncate_shard, delete_shard, delete_shard_file, add_file_to_shard, swap_shards,
    flip_part_bytes, truncate_part, delete_part, delete_rows, drop_column, retype_column, edit_value,
    rewrite_shard_path, delete_record, edit_record, flip_record_bytes, edit_plan,
]  # fmt: skip
