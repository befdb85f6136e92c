"""The integrity record (issue 26, item 2): an edit of a buffer cannot switch its checks off.

A table of the reproductions, each a command with its exit code, first line and the files before and
after; then a property test: a seeded generator (tests/mutations.py) damages a small buffer at random and
`buffer verify --deep` must name a problem for every mutation that changes what `train` reads, while the
reader `train` uses (the same manifest read and BufferReader) must refuse the buffer with one clear error
(never read altered bytes) unless --skip-damaged, and then only yield intact entries. Both formats.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from streamalign.buffer.formats import DamagedShardError, get_format
from streamalign.buffer.integrity import SEAL, IntegrityError, build_seal, write_seal
from streamalign.buffer.manifest import MANIFEST_DIR, read_manifest
from streamalign.buffer.reader import BufferReader
from streamalign.buffer.urls import location
from streamalign.buffer.verify import seal_buffer, verify_buffer
from streamalign.cli import app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.pipeline import Pipeline
from streamalign.worlds.shapes import held_in_prompts

from .mutations import MUTATIONS

PROMPTS = tuple(p.text for p in held_in_prompts()[::40])
TRAIN = ["--steps", "1", "--batch-groups", "2", "--lr", "1e-4", "--lora-rank", "4", "--lora-alpha", "8",
         "--threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def policy():
    return Pipeline.load("shapes")


def _collect(policy, out: Path, fmt: str, groups: int = 3) -> Path:
    cfg = CollectConfig(prompts=PROMPTS, groups=groups, group_size=2, entries_per_shard=1, format=fmt)
    collect(policy, cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, policy) -> dict[str, Path]:
    """A webdataset buffer of 3 shards and a zarr buffer of 2, one group of 2 branches each."""
    root = tmp_path_factory.mktemp("pristine")
    return {"webdataset": _collect(policy, root / "tar", "webdataset"),
            "zarr": _collect(policy, root / "zarr", "zarr", groups=2)}  # fmt: skip


def copy(src: Path, tmp_path: Path, name: str = "buf") -> Path:
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(monkeypatch, *args: str) -> tuple[int, list[str]]:
    monkeypatch.setenv("TQDM_DISABLE", "1")
    r = CliRunner().invoke(app, ["-q", *args])
    return r.exit_code, [line for line in r.output.splitlines() if line.strip()]


def rewrite_part(part: Path, fn) -> None:
    """The part rewritten as `fn(table)` (its metadata kept), as an editor would."""
    meta = pq.read_schema(part).metadata
    pq.write_table(fn(pq.read_table(part)).replace_schema_metadata(meta), part)


# ---------------------------------------------------------------------------------------------------
# the reproductions: (name, edit of the buffer, expected first line of verify --deep, of info/stats/train)
# ---------------------------------------------------------------------------------------------------
PART = f"{MANIFEST_DIR}/shard-000001.tar.parquet"


def drop_checksum(buf: Path) -> None:
    rewrite_part(buf / PART, lambda t: t.drop_columns(["checksum"]))


def delete_rows(buf: Path) -> None:
    rewrite_part(buf / PART, lambda t: t.slice(0, 1))


def delete_part(buf: Path) -> None:
    (buf / PART).unlink()


def absolute_shard(buf: Path) -> None:
    """The shard's rows point at an absolute path outside the buffer, where a valid copy lies."""
    outside = buf.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(buf / "shard-000001.tar", outside / "shard-000001.tar")
    target = str(outside / "shard-000001.tar")
    rewrite_part(buf / PART, lambda t: t.set_column(t.column_names.index("shard"), "shard",
                                                     pa.array([target] * t.num_rows)))  # fmt: skip


def retype_branch(buf: Path) -> None:
    rewrite_part(buf / PART, lambda t: t.set_column(t.column_names.index("branch"), "branch",
                                                     t.column("branch").cast(pa.int32())))  # fmt: skip


def delete_record(buf: Path) -> None:
    (buf / MANIFEST_DIR / SEAL).unlink()


CASES = [
    ("checksum column dropped", drop_checksum, "DAMAGED shard-000001.tar: manifest/shard-000001.tar.parquet: lacks "
     "the column(s) checksum", "manifest/shard-000001.tar.parquet: lacks the column(s) checksum"),
    ("rows deleted", delete_rows, "DAMAGED shard-000001.tar: manifest/shard-000001.tar.parquet: holds 1 rows, the "
     "record lists 2", "manifest/shard-000001.tar.parquet: holds 1 rows, the record lists 2"),
    ("part deleted", delete_part, "DAMAGED shard-000001.tar: its manifest part manifest/shard-000001.tar.parquet is "
     "missing", "manifest/shard-000001.tar.parquet is missing (the integrity record lists it)"),
    ("shard path outside", absolute_shard, "DAMAGED shard-000001.tar: manifest/shard-000001.tar.parquet: its values "
     "differ", "manifest/shard-000001.tar.parquet: its values differ"),
    ("column retyped", retype_branch, "DAMAGED shard-000001.tar: manifest/shard-000001.tar.parquet: column branch is "
     "int32, recorded int64", "column branch is int32, recorded int64"),
    ("record deleted", delete_record, "INCOMPLETE the collection: all 3 shards written, no integrity record",
     "has all 3 shards but no integrity record"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "edit", "verify_line", "read_line"), CASES, ids=[c[0] for c in CASES])
def test_reproductions_are_named_problems_and_stop_every_reader(tmp_path, monkeypatch, pristine, name, edit,
                                                                verify_line, read_line):  # fmt: skip
    buf = copy(pristine["webdataset"], tmp_path)
    edit(buf)
    before = files(buf)
    code, lines = cli(monkeypatch, "buffer", "verify", str(buf), "--deep")
    assert code == 1 and lines[0].startswith(verify_line), lines
    for args in (["buffer", "info", str(buf)], ["stats", str(buf), "--report", "pivots"]):
        code, lines = cli(monkeypatch, *args)
        assert code == 2 and len(lines) == 1 and read_line in lines[0] and lines[0].startswith("error: "), lines
    assert files(buf) == before  # readers write nothing
    with pytest.raises(IntegrityError, match=read_line.replace("(", r"\(").replace(")", r"\)")):
        BufferReader(buf)


def test_train_refuses_a_buffer_whose_part_lost_its_checksum_column(tmp_path, monkeypatch, pristine):
    buf = copy(pristine["webdataset"], tmp_path)
    drop_checksum(buf)
    before = files(buf)
    code, lines = cli(monkeypatch, "train", "--out", str(tmp_path / "run"), "--buffer", str(buf), *TRAIN)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: buffer {buf}: manifest/shard-000001.tar.parquet: lacks the column(s) checksum")
    assert files(buf) == before and not (tmp_path / "run" / "adapter").exists()
    code, lines = cli(monkeypatch, "train", "--out", str(tmp_path / "skip"), "--buffer", str(buf), *TRAIN,
                      "--skip-damaged")  # fmt: skip
    assert code == 2 and "lacks the column(s) checksum" in lines[0], lines  # a manifest is not a skippable shard


def test_shard_names_never_leave_the_buffer(tmp_path):
    where = location(tmp_path)
    for bad in ("/etc/passwd", "../x/shard-000000.tar", "a/../../b", "s3://b/x", "a\\b"):
        with pytest.raises(ValueError, match="not a path inside the buffer"):
            where.shard(bad)
    (tmp_path / "shard-000000.tar").symlink_to("/etc/hostname")
    with pytest.raises(ValueError, match="outside the buffer"):
        where.shard("shard-000000.tar")


def test_an_older_buffer_is_refused_until_sealed_and_seal_checks_first(tmp_path, monkeypatch, pristine):
    buf = copy(pristine["webdataset"], tmp_path)
    for name in (SEAL, "collection.json"):  # as written before records (and before recorded settings)
        (buf / MANIFEST_DIR / name).unlink()
    code, lines = cli(monkeypatch, "buffer", "info", str(buf))
    assert code == 2 and "are in no integrity record" in lines[0] and f"streamalign buffer seal {buf}" in lines[0]
    code, lines = cli(monkeypatch, "buffer", "verify", str(buf))
    assert code == 1 and lines[0].startswith("UNSEALED 3 manifest part(s) in no integrity record"), lines
    damaged = copy(buf, tmp_path, "damaged")  # an older buffer's damage is found before it is sealed
    absolute_shard(damaged)
    before = files(damaged)
    code, lines = cli(monkeypatch, "buffer", "seal", str(damaged))
    assert code == 2 and "cannot seal" in lines[0] and "rows name the shard(s)" in lines[0], lines
    assert files(damaged) == before
    code, lines = cli(monkeypatch, "buffer", "seal", str(buf))
    assert code == 0 and lines == [f"sealed 1 collection(s) of {buf}: 3 shards checked and recorded"], lines
    assert read_manifest(buf).num_rows == 6 and verify_buffer(buf, deep=True).ok
    rec = json.loads((buf / MANIFEST_DIR / SEAL).read_text())
    sealed_by_collect = json.loads((pristine["webdataset"] / MANIFEST_DIR / SEAL).read_text())
    assert rec["shards"] == sealed_by_collect["shards"] and rec["parts"] == sealed_by_collect["parts"]
    assert rec["groups"] is None and sealed_by_collect["groups"] == 3
    code, lines = cli(monkeypatch, "buffer", "seal", str(buf))
    assert code == 0 and "nothing to seal" in lines[0]


def test_partial_collections_resume_and_are_sealed_at_the_end(tmp_path, monkeypatch, policy, pristine):
    """Killed before its last shard: readers refuse the unfinished collection, verify checks what is there,
    and the same collect command finishes and seals it with the bytes of an uninterrupted run."""
    buf = copy(pristine["webdataset"], tmp_path)
    for rel in ("shard-000002.tar", f"{MANIFEST_DIR}/shard-000002.tar.parquet", f"{MANIFEST_DIR}/{SEAL}"):
        (buf / rel).unlink()
    with pytest.raises(IntegrityError, match=r"the collection is unfinished \(2 of 3 shards written"):
        read_manifest(buf)
    rewrite_part(buf / f"{MANIFEST_DIR}/shard-000001.tar.parquet", lambda t: t.slice(0, 1))
    report = verify_buffer(buf)
    assert report.incomplete and report.problems == ["shard-000001.tar: manifest/shard-000001.tar.parquet: entry "
                                                     f"{read_ids(pristine['webdataset'])[1]} has branches [0], its "
                                                     "group size is 2 (rows deleted?): restore it from a copy, or "
                                                     "delete the part and its shard and re-run the collect "
                                                     "command"]  # fmt: skip
    with pytest.raises(IntegrityError, match="rows deleted"):  # the resumed collect never records it as good
        _collect(policy, buf, "webdataset")
    assert not (buf / MANIFEST_DIR / SEAL).exists()
    shutil.copy(pristine["webdataset"] / f"{MANIFEST_DIR}/shard-000001.tar.parquet", buf / MANIFEST_DIR)
    _collect(policy, buf, "webdataset")
    assert files(buf) == files(pristine["webdataset"])  # the record included: same bytes as uninterrupted
    code, lines = cli(monkeypatch, "buffer", "verify", str(buf), "--deep")
    assert code == 0, lines


def read_ids(buf: Path) -> list[str]:
    return sorted({r["entry_id"] for r in read_manifest(buf).to_pylist()})


def test_a_rerun_collect_never_records_an_edited_part_as_good(tmp_path, policy, pristine):
    buf = copy(pristine["webdataset"], tmp_path)
    drop_checksum(buf)
    before = files(buf)
    with pytest.raises(IntegrityError, match="lacks the column"):
        _collect(policy, buf, "webdataset")
    assert files(buf) == before


def test_verify_deep_flags_non_finite_tensors(tmp_path, pristine):
    """A shard written (checksum, part and record consistent) with an inf latent: only --deep can tell."""
    from streamalign.buffer.formats import write_shard
    from streamalign.buffer.manifest import write_manifest_part

    src = pristine["zarr"] / "shard-000000.zarr"
    (entry,) = get_format("zarr").read(src)
    entry.x_t = entry.x_t.clone()
    entry.x_t.view(-1)[3] = float("inf")
    buf = tmp_path / "buf"
    info = write_shard(get_format("zarr"), buf / "shard-000000.zarr", [entry])
    write_manifest_part(buf, [entry], info)
    with pytest.raises(ValueError, match=r"cannot seal .*non-finite x_t"):
        seal_buffer(buf)  # buffer seal checks deeply first
    write_seal(buf, build_seal(buf, "", [info.path.name], None, lambda n: info.bytes, lambda n: info.checksum))
    assert verify_buffer(buf).ok
    assert verify_buffer(buf, deep=True).problems == [f"shard-000000.zarr: entry {entry.entry_id}: non-finite x_t "
                                                      "(1 value(s))"]  # fmt: skip


def test_buffer_info_shows_the_records_digest(pristine):
    from streamalign.buffer.inspect import buffer_info

    info = buffer_info(pristine["zarr"])["integrity"]
    seal = (pristine["zarr"] / MANIFEST_DIR / SEAL).read_bytes()
    assert info == {"records": 1, "sha256": hashlib.sha256(hashlib.sha256(seal).hexdigest().encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------------
# the property: random damage is always named by verify --deep and never read by train
# ---------------------------------------------------------------------------------------------------
def entry_digest(entry) -> str:
    meta, tensors = entry.to_record()
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_read(buf: Path, skip_damaged: bool = False) -> tuple:
    """What `train --buffer` reads: the manifest (its config check) and one epoch of the reader."""
    rows = sorted(json.dumps(r, sort_keys=True, default=str) for r in read_manifest(buf).to_pylist())
    reader = BufferReader(buf, 0, 1, shuffle=1, seed=0, skip_damaged=skip_damaged)
    return rows, [(e.entry_id, entry_digest(e)) for e in reader]


def check_mutations(src: Path, tmp_path: Path, seed: int, count: int, train_every: int = 0, monkeypatch=None) -> dict:
    """Apply `count` random mutations (each to a fresh copy of `src`); returns counts by outcome."""
    rows0, entries0 = train_read(src)
    intact = dict(entries0)
    rng = random.Random(seed)
    outcome: dict[str, int] = {}
    for i in range(count):
        buf = copy(src, tmp_path, f"m{i}")
        what = rng.choice(MUTATIONS)(buf, rng)
        report = verify_buffer(buf, deep=True)
        try:
            got = train_read(buf)
        except (ValueError, OSError) as e:  # what the CLI turns into one line and exit 2
            assert "\n" not in str(e), (what, str(e))
            got = e
        refused = not isinstance(got, tuple)
        assert refused or got == (rows0, entries0), f"{what}: train read altered data without an error"
        assert not report.ok, f"{what}: verify --deep reports nothing"  # every mutation here is real damage
        kind = "refused" if refused else "unchanged"  # unchanged: a record's value no reader uses (a size)
        outcome[kind] = outcome.get(kind, 0) + 1
        if isinstance(got, DamagedShardError):  # with --skip-damaged: only intact entries, or a refusal
            try:
                kept = train_read(buf, skip_damaged=True)[1]
                assert all(intact.get(k) == v for k, v in kept), f"{what}: --skip-damaged read altered bytes"
            except (ValueError, OSError):
                pass
        if train_every and i % train_every == 0 and refused:
            code, lines = cli(monkeypatch, "train", "--out", str(tmp_path / f"run{i}"), "--buffer", str(buf), *TRAIN)
            assert code == 2 and len(lines) == 1, (what, lines)
        shutil.rmtree(buf)
    return outcome


DEFAULT_MUTATIONS = {"webdataset": 40, "zarr": 12}  # in the default run (a zarr shard decodes ~5x slower)


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_random_damage_is_always_named_and_never_trained_on(tmp_path, pristine, fmt):
    n = DEFAULT_MUTATIONS[fmt]
    outcome = check_mutations(pristine[fmt], tmp_path, seed=26, count=n)
    print(f"{fmt}: {n} mutations: {outcome}")
    assert sum(outcome.values()) == n and outcome.get("refused", 0) >= 0.9 * n


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_random_damage_many_seeds_and_train_itself_refuses(tmp_path, monkeypatch, pristine, fmt):
    outcome = check_mutations(pristine[fmt], tmp_path, seed=2026, count=400, train_every=20, monkeypatch=monkeypatch)
    print(f"{fmt}: 400 mutations: {outcome}")
    assert sum(outcome.values()) == 400 and outcome.get("refused", 0) >= 0.9 * 400


def test_records_are_checked_through_urls_and_verify_needs_a_buffer(tmp_path, pristine):
    buf = copy(pristine["webdataset"], tmp_path)
    drop_checksum(buf)
    for url in (f"file://{buf}", f"pipe:cat {buf}/{{}}"):  # pipe: finds the record through manifest/index.txt
        with pytest.raises(IntegrityError, match="lacks the column"):
            BufferReader(url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        verify_buffer(tmp_path / "empty")
