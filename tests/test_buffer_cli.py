"""`buffer info`, `buffer verify` (damage -> exit 1) and `stats` (DuckDB, read-only) on a small buffer."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.pipeline import Pipeline
from streamalign.worlds.shapes import held_in_prompts

run = CliRunner().invoke


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    out = tmp_path_factory.mktemp("buf")
    prompts = tuple(p.text for p in held_in_prompts()[::50])
    collect(
        Pipeline.load("shapes"),
        CollectConfig(prompts=prompts, groups=4, group_size=3, entries_per_shard=2),
        out,
        progress=False,
    )
    return out


def test_info(buffer):
    r = run(app, ["buffer", "info", str(buffer)])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert (info["groups"], info["branches"], info["shards"], info["rejected_groups"]) == (4, 12, 2, 0)
    assert info["formats"] == {"webdataset": 4} and sum(info["pivots"].values()) == 4
    assert "colour_match" in info["rewards"] and info["bytes_per_group"] > 0


def test_verify_finds_altered_truncated_missing_and_orphan_shards(buffer, tmp_path):
    assert run(app, ["buffer", "verify", str(buffer), "--deep"]).exit_code == 0
    for damage in ("alter", "truncate", "missing", "orphan"):
        copy = tmp_path / damage
        shutil.copytree(buffer, copy)
        shard = copy / "shard-000001.tar"
        if damage == "alter":
            data = bytearray(shard.read_bytes())
            data[len(data) // 2] ^= 1
            shard.write_bytes(bytes(data))
        elif damage == "truncate":
            shard.write_bytes(shard.read_bytes()[:1000])
        elif damage == "missing":
            shard.unlink()
        else:
            (copy / "manifest" / "shard-000001.tar.parquet").unlink()
        r = run(app, ["buffer", "verify", str(copy)])
        assert r.exit_code == 1 and "DAMAGED shard-000001.tar" in r.output, (damage, r.output)


def test_stats_reports_sql_and_formats(buffer, tmp_path):
    for report in ("per-prompt", "zero-variance", "pivots", "correlation", "by-policy"):
        r = run(app, ["stats", str(buffer), "--report", report])
        assert r.exit_code == 0, (report, r.output)
    r = run(
        app,
        ["stats", str(buffer), "--sql", 'SELECT "pivot", count(*) AS n FROM manifest GROUP BY 1', "--format", "json"],
    )
    assert sum(row["n"] for row in json.loads(r.output)) == 12
    r = run(app, ["stats", str(buffer), "--report", "pivots", "--format", "csv"])
    assert r.output.splitlines()[0] == '"pivot","groups","mean_group_std","min_group_std"'
    out = tmp_path / "corr.parquet"
    assert (
        run(
            app, ["stats", str(buffer), "--report", "correlation", "--format", "parquet", "--output", str(out)]
        ).exit_code
        == 0
    )
    assert pq.read_table(out).num_rows == 21  # 6 rewards + composite -> 7 choose 2 pairs


@pytest.mark.parametrize(
    ("sql", "msg"),
    [
        ("DROP VIEW manifest", "read-only: DROP statements are refused"),
        ("SELECT 1; DELETE FROM manifest", "one statement at a time"),
        ("COPY manifest TO '/tmp/x.csv'", "read-only"),
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
        ("SELECT nope FROM manifest", "query failed"),
    ],
)
def test_stats_refuses_writes_with_one_line(buffer, sql, msg):
    r = run(app, ["stats", str(buffer), "--sql", sql])
    assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
