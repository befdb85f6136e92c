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


@pytest.fixture(scope="module")
def labelled_buffer(tmp_path_factory):
    """A tiny buffer whose reward labels carry options (``reward_direction_match:top30``)."""
    out = tmp_path_factory.mktemp("labelled")
    collect(
        Pipeline.load("shapes"),
        CollectConfig(prompts=(held_in_prompts()[0].text,), groups=2, group_size=2, entries_per_shard=2,
                      rewards="colour_match=1,direction_match:top30=1"),
        out,
        progress=False,
    )  # fmt: skip
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


@pytest.mark.parametrize("report", ["per-prompt", "zero-variance", "pivots", "correlation", "by-policy"])
def test_stats_reports_quote_reward_labels_with_options(labelled_buffer, report):
    r = run(app, ["stats", str(labelled_buffer), "--report", report, "--format", "json"])
    assert r.exit_code == 0, (report, r.output)
    rows = json.loads(r.output)
    if report == "per-prompt":
        assert "mean_reward_direction_match:top30" in rows[0] and rows[0]["groups"] == 2
    if report == "by-policy":
        assert rows[0]["reward_direction_match:top30"] is not None
    if report == "correlation":
        assert {"reward_direction_match:top30"} <= {row["a"] for row in rows} | {row["b"] for row in rows}


def test_report_identifiers_double_embedded_quotes():
    import pyarrow as pa

    from streamalign.buffer.stats import reports

    table = pa.table({"reward_a\"b:top30": [1.0], "composite": [1.0]})
    assert 'avg("reward_a""b:top30") AS "reward_a""b:top30"' in reports(table)["by-policy"]


@pytest.mark.parametrize(
    "sql",
    ['SELECT 1 AS "update"', "SELECT $$a;b$$ AS s", "SELECT count(*) AS n FROM manifest; -- branches; all of them",
     "WITH t AS (SELECT composite FROM manifest) SELECT avg(composite) AS m FROM t", "FROM manifest LIMIT 1"],
)  # fmt: skip
def test_stats_accepts_every_single_select(buffer, sql):
    r = run(app, ["stats", str(buffer), "--sql", sql, "--format", "json"])
    assert r.exit_code == 0, (sql, r.output)
    assert json.loads(r.output)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [("SET threads = 1", "SET"), ("PRAGMA version", "PRAGMA"), ("ATTACH 'x.db'", "ATTACH"),
     ("INSERT INTO manifest SELECT * FROM manifest", "INSERT"), ("EXPLAIN SELECT 1", "EXPLAIN")],
)  # fmt: skip
def test_stats_refusal_names_the_statement_type(buffer, sql, kind):
    r = run(app, ["stats", str(buffer), "--sql", sql])
    assert r.exit_code == 2 and f"read-only: {kind} statements are refused" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
