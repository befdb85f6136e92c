"""Buffers read through URLs (streamalign.buffer.urls): file://, pipe:cat and an fsspec file system (memory://)
give the entries, counts per rank, stats, info and training (resume included) of the plain path; checksums
are verified over every transport; clear errors for what a URL cannot do."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from typer.testing import CliRunner

from streamalign.buffer.formats import DamagedShardError
from streamalign.buffer.inspect import buffer_info
from streamalign.buffer.reader import BufferReader
from streamalign.buffer.stats import run_query
from streamalign.buffer.urls import location
from streamalign.cli import app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.extras import available
from streamalign.io.files import checksum, files_digest
from streamalign.pipeline import Pipeline
from streamalign.worlds.shapes import held_in_prompts

from .test_train import _cfg, base  # noqa: F401 - the random-weight base is a fixture

PROMPTS = tuple(p.text for p in held_in_prompts()[::50])


@pytest.fixture(scope="module")
def buffers(tmp_path_factory, base) -> dict[str, Path]:  # noqa: F811
    """A webdataset and a zarr buffer (4 groups of 4 in 2-group shards), collected from the test base."""
    out = {}
    for fmt in ("webdataset", "zarr"):
        folder = tmp_path_factory.mktemp(fmt)
        cfg = CollectConfig(prompts=PROMPTS, groups=4, group_size=4, entries_per_shard=2, seed=5, format=fmt)
        collect(Pipeline.load("shapes", base), cfg, folder, progress=False)
        out[fmt] = folder
    return out


def in_memory(folder: Path, name: str) -> str:
    """`folder` copied into fsspec's in-memory file system; its URL."""
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)
    fs.put(f"{folder}/", f"/{name}", recursive=True)
    return f"memory://{name}"


def urls(folder: Path, fmt: str) -> list[str]:
    out = [f"file://{folder}", in_memory(folder, f"{fmt}-{folder.name}")]
    return [*out, f"pipe:cat {folder}/{{}}"] if fmt == "webdataset" else out  # a stream: one file per shard


def stream(folder, rank: int, world: int, epoch: int, **kw) -> list:
    reader = BufferReader(folder, rank, world, shuffle=3, seed=2, **kw)
    reader.set_epoch(epoch)
    return [(len(reader), e.entry_id, e.x0_old, e.rewards["colour_match"]) for e in reader]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3])
                                    for x, y in zip(a, b, strict=True))  # fmt: skip


def test_digest_of_files_in_memory_equals_the_checksum_on_disk(tmp_path):
    for rel in ("a/b", "a-c", "a/b-d/e", "a.b", "z"):  # '-' < '/' as characters, not as path parts
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_bytes(rel.encode() * 3)
    assert files_digest(location(tmp_path).tree("tree")) == checksum(tmp_path / "tree")
    assert files_digest(location(tmp_path).tree("tree/a-c")) == checksum(tmp_path / "tree" / "a-c")


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_every_url_streams_the_entries_of_the_plain_path(buffers, fmt):
    folder = buffers[fmt]
    for url in urls(folder, fmt):
        for epoch in (0, 1):
            for rank in (0, 1):  # equal counts per rank, same order: the reader only changed transport
                assert same(stream(url, rank, 2, epoch), stream(folder, rank, 2, epoch)), (url, epoch, rank)
        sql = "SELECT entry_id, avg(composite) AS c FROM manifest GROUP BY 1 ORDER BY 1"
        assert run_query(url, sql).to_pylist() == run_query(folder, sql).to_pylist()
        assert buffer_info(url) == buffer_info(folder)
        where = 'SELECT entry_id FROM manifest WHERE "pivot" > 0'
        assert same(stream(url, 0, 1, 0, where=where), stream(folder, 0, 1, 0, where=where))


def test_checksums_are_verified_through_urls(buffers, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(buffers["webdataset"], copy)
    data = bytearray((copy / "shard-000001.tar").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "shard-000001.tar").write_bytes(bytes(data))
    for url in (f"pipe:cat {copy}/{{}}", in_memory(copy, "damaged")):
        with pytest.raises(DamagedShardError, match=r"shard-000001\.tar.*checksum"):
            stream(url, 0, 1, 0)
        kept = stream(url, 0, 1, 0, skip_damaged=True)  # made up from the intact shard: the count stays
        intact = {e[1] for e in stream(buffers["webdataset"], 0, 1, 0)}
        assert len(kept) == kept[0][0] and {e[1] for e in kept} <= intact


def test_training_through_urls_equals_the_plain_path_and_resumes_exactly(tmp_path, base, buffers):  # noqa: F811
    from streamalign.train.loop import train

    folder = buffers["webdataset"]
    train(_cfg(base, folder), tmp_path / "plain", progress=False)
    url = f"pipe:cat {folder}/{{}}"
    train(_cfg(base, url, steps=2), tmp_path / "url", progress=False)  # "interrupted" after 2 updates
    train(_cfg(base, url), tmp_path / "url", resume=True, progress=False)
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (tmp_path / "plain" / adapter).read_bytes() == (tmp_path / "url" / adapter).read_bytes()


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_collect_uploads_each_shard_then_its_part_and_resumes(tmp_path, base, buffers, fmt):  # noqa: F811
    plain, local, remote = buffers[fmt], tmp_path / "local", tmp_path / "remote"
    url = f"local://{remote}"  # fsspec's local file system: the fsspec path, no network
    cfg = CollectConfig(prompts=PROMPTS, groups=4, group_size=4, entries_per_shard=2, seed=5, format=fmt, upload=url)
    policy = Pipeline.load("shapes", base)
    s = collect(policy, cfg, local, progress=False)
    names = sorted(p.name for p in plain.glob("shard-*"))
    assert s.shards_written == 2 and sorted(p.name for p in remote.glob("shard-*")) == names
    assert not list(local.glob("shard-*")) and len(list((local / "manifest").glob("*.parquet"))) == 2
    assert {n: checksum(remote / n) for n in names} == {n: checksum(plain / n) for n in names}
    assert same(stream(url, 0, 1, 0), stream(plain, 0, 1, 0)) and buffer_info(url) == buffer_info(plain)
    # killed after the second shard was put but before its part was: the next run puts both, computes nothing
    part = f"manifest/{names[1]}.parquet"
    (remote / part).unlink()
    shutil.copytree(remote / names[1], local / names[1]) if fmt == "zarr" else shutil.copy(remote / names[1], local)
    again = collect(policy, cfg, local, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 2) and (remote / part).is_file()
    assert not list(local.glob("shard-*")) and same(stream(url, 0, 1, 0), stream(plain, 0, 1, 0))


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["stats", "pipe:cat /nowhere", "--report", "pivots"], "a pipe: URL needs '{}' where the file's"),
        (["stats", "pipe:cat /nowhere/{}", "--report", "pivots"], "cannot list manifest/ without its index.txt"),
        (["collect", "--out", "s3://bucket/buf", "--groups", "1"], "--out needs a local path or file:// URL"),
        (["collect", "--out", "x", "--upload", "pipe:cat {}"], "--upload pipe:cat {}: pipe: URLs are read-only"),
        (["buffer", "verify", "pipe:cat /x/{}"], "buffer verify needs a local path or file:// URL"),
        (["stats", "nosuch://bucket/buf", "--report", "pivots"], "Protocol not known: nosuch"),
    ],
)
def test_what_a_url_cannot_do_is_one_clear_line(args, msg):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and msg in r.output, r.output


def test_zarr_through_a_pipe_and_s3_without_its_package_are_clear(buffers):
    with pytest.raises(Exception, match="a zarr shard is a folder"):
        stream(f"pipe:cat {buffers['zarr']}/{{}}", 0, 1, 0)
    if not available("s3fs"):
        r = CliRunner().invoke(app, ["stats", "s3://bucket/buf", "--report", "pivots"])
        assert r.exit_code == 2 and "pip install 'streamalign[remote]'" in r.output, r.output
