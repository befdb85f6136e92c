"""`stats`: DuckDB SQL over a buffer's manifest (read-only), plus named reports.

The manifest parts are exposed as the view ``manifest`` (one row per branch; reward columns
``reward_<name>`` and ``composite``; ``pivot`` is an SQL keyword in DuckDB, so write ``"pivot"``; a reward
label with options such as ``reward_clip:top30`` must be quoted too). Only one SELECT statement (as DuckDB's
own parser classifies it) runs: anything else is refused, and queries cannot touch files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pyarrow as pa

from ..io.outputs import check_output_file, output_file
from ..schemas.run import RunConfig, arg
from .manifest import read_manifest


def reward_columns(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c.startswith("reward_")] + ["composite"]


def ident(name: str) -> str:
    """`name` as a quoted SQL identifier (embedded double quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """`text` as an SQL string literal (embedded single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def reports(table: pa.Table) -> dict[str, str]:
    """The named reports as SQL over the `manifest` view (every column name quoted: reward labels may hold
    ``:`` or other characters an unquoted identifier cannot)."""
    cols = reward_columns(table)
    q = ident
    per_prompt = ", ".join(f"avg({q(c)}) AS {q('mean_' + c)}, stddev_samp({q(c)}) AS {q('std_' + c)}" for c in cols)
    by_policy = ", ".join(f"avg({q(c)}) AS {q(c)}" for c in cols)
    pairs = [(a, b) for i, a in enumerate(cols) for b in cols[i + 1 :]]
    corr = " UNION ALL ".join(
        f"SELECT {literal(a)} AS a, {literal(b)} AS b, corr({q(a)}, {q(b)}) AS corr FROM manifest" for a, b in pairs
    )
    return {
        "per-prompt": f"SELECT prompt, count(DISTINCT entry_id) AS groups, {per_prompt} FROM manifest "
        "GROUP BY prompt ORDER BY prompt",
        "zero-variance": 'SELECT entry_id, prompt, "pivot", stddev_pop(composite) AS std FROM manifest '
        'GROUP BY entry_id, prompt, "pivot" HAVING stddev_pop(composite) < 1e-6 ORDER BY entry_id',
        "pivots": 'SELECT "pivot", count(*) AS groups, avg(s) AS mean_group_std, min(s) AS min_group_std FROM '
        '(SELECT entry_id, any_value("pivot") AS "pivot", stddev_pop(composite) AS s FROM manifest GROUP BY 1) '
        "GROUP BY 1 ORDER BY 1",
        "correlation": corr or "SELECT NULL AS a, NULL AS b, NULL AS corr WHERE false",
        "by-policy": f"SELECT policy_id, count(DISTINCT entry_id) AS groups, {by_policy} FROM manifest "
        "GROUP BY policy_id ORDER BY policy_id",
    }


def check_read_only(sql: str) -> None:
    """Accept exactly one statement that DuckDB's parser classifies as SELECT (this includes WITH, FROM-first,
    VALUES, DESCRIBE and SUMMARIZE); refuse anything else with one line naming the statement type."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise ValueError(f"query failed: {str(e).splitlines()[0]}") from None
    if not statements:
        raise ValueError("--sql holds no statement: give one SELECT over the view `manifest`")
    if len(statements) > 1:
        kinds = ", ".join(st.type.name for st in statements)
        raise ValueError(f"stats runs one statement at a time, got {len(statements)} ({kinds}): keep one SELECT")
    kind = statements[0].type.name
    if kind != "SELECT":
        raise ValueError(f"stats is read-only: {kind} statements are refused; use one SELECT over the view `manifest`")


def run_query(folder: str | Path, sql: str | None = None, report: str | None = None,
              table: pa.Table | None = None) -> pa.Table:  # fmt: skip
    """Result of `sql` (or of the named `report`) over the buffer's manifest (`table`, when read already),
    as an Arrow table."""
    import duckdb

    table = read_manifest(folder) if table is None else table
    if report is not None:
        named = reports(table)
        if report not in named:
            raise ValueError(f"unknown report {report!r}: choose one of {', '.join(named)}")
        sql = named[report]
    if not sql:
        raise ValueError("give --sql 'SELECT ...' or --report NAME")
    check_read_only(sql)
    con = duckdb.connect(":memory:")
    try:
        con.register("manifest_arrow", table)
        con.execute("CREATE VIEW manifest AS SELECT * FROM manifest_arrow")
        con.execute("SET enable_external_access = false")  # no file or network access from the query
        try:
            rel = con.sql(sql)
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        except duckdb.Error as e:
            raise ValueError(f"query failed: {str(e).splitlines()[0]}") from None
    finally:
        con.close()


def format_table(table: pa.Table, max_rows: int = 200) -> str:
    """A plain aligned text table (floats with 4 significant digits)."""
    rows = table.slice(0, max_rows).to_pylist()
    cols = table.column_names

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows (use --format csv|json|parquet for all)")
    return "\n".join(lines)


def write_result(table: pa.Table, fmt: str, out: str | Path | None, overwrite: bool = False) -> str | None:
    """csv / json to `out` or as returned text; parquet needs `out`. `out` follows the output rules
    (``io.outputs.output_file``): a file of the user's is never replaced, one of streamalign's with `overwrite`."""
    import io
    import json

    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt == "parquet":
        if out is None:
            raise ValueError("--format parquet needs --output FILE")
        with output_file(out, "--output", "stats", overwrite) as tmp:  # never half-written (a full disk, an error)
            pq.write_table(table, tmp)
        return None
    if fmt == "csv":
        buf = io.BytesIO()
        pcsv.write_csv(table, buf)
        text = buf.getvalue().decode()
    elif fmt == "json":
        text = json.dumps(table.to_pylist(), indent=1, default=str)
    elif fmt == "table":
        text = format_table(table)
    else:
        raise ValueError(f"unknown format {fmt!r}: table | csv | json | parquet")
    if out is not None:
        with output_file(out, "--output", "stats", overwrite) as tmp:
            tmp.write_text(text)
        return None
    return text


class StatsRun(RunConfig):
    """DuckDB SQL over the buffer manifest (one row per branch, reward_<name> columns), or a named report."""

    folder: str = arg(..., "Buffer folder.", argument=True)
    sql: str | None = arg(None, "Read-only SQL over the view `manifest`.")
    report: Literal["per-prompt", "zero-variance", "pivots", "correlation", "by-policy"] | None = arg(
        None, "A named report.")
    format: Literal["table", "csv", "json", "parquet"] = arg("table", "Output format.")
    output: str | None = arg(None, "Write the result to this file.")
    overwrite: bool = arg(False, "Replace --output when a streamalign command wrote it (a file no streamalign "
                          "command wrote is never replaced).")  # fmt: skip


def stats_stage(cfg: StatsRun) -> str:
    if cfg.output is not None:  # before the query runs
        check_output_file(cfg.output, "--output", cfg.overwrite)
    return write_result(run_query(cfg.folder, cfg.sql, cfg.report), cfg.format, cfg.output, cfg.overwrite) or ""
