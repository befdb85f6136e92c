"""Measured results as data: ``results/<name>.json`` holds provenance (``meta``) and named tables, and the
tables in ``docs/*.md`` are rendered from those files between ``<!-- results:NAME:TABLE -->`` and
``<!-- /results:NAME:TABLE -->`` (``python bench/render_results.py``), so a re-measurement is a data commit.

A table is ``{"columns": [header, ...], "formats": [cell format, ...], "rows": [[value, ...], ...]}``: each
cell is ``format.format(*value)`` for a list value (e.g. a paired difference and its interval with
``"{:+.3f} [{:+.3f}, {:+.3f}]"``), ``format.format(value)`` otherwise, and ``-`` for ``None``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import write_atomic

MARKER = re.compile(r"<!-- results:([\w-]+):([\w-]+) -->\n(.*?)<!-- /results:\1:\2 -->", re.S)


def table(columns: Sequence[str], formats: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict:
    """One table of a results file; every row has one value per column."""
    if len(formats) != len(columns) or any(len(r) != len(columns) for r in rows):
        raise ValueError(f"table of {len(columns)} columns with {len(formats)} formats or a row of another length")
    return {"columns": list(columns), "formats": list(formats), "rows": [list(r) for r in rows]}


def write_results(path: str | Path, meta: dict, tables: dict[str, dict], data: Any = None) -> Path:
    """Write ``{"meta", "tables"[, "data"]}`` atomically to `path` (its folder is created); returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "tables": tables, **({"data": data} if data is not None else {})}
    return write_atomic(path, json.dumps(doc, indent=1) + "\n")


def cell(fmt: str, value: Any) -> str:
    if value is None:
        return "-"
    return fmt.format(*value) if isinstance(value, list) else fmt.format(value)


def render_table(doc: dict, name: str, source: str) -> str:
    """The markdown of table `name` of a loaded results file, and a line naming its source and command."""
    t = doc["tables"][name]
    lines = ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(cell(f, v) for f, v in zip(t["formats"], row, strict=True)) + " |" for row in t["rows"]]
    meta = doc.get("meta", {})
    how = f"`{meta['command']}`" if meta.get("command") else "no command"
    note = f"; {meta['note']}" if meta.get("note") else ""
    return "\n".join(lines) + f"\n\n<sub>Data: `{source}` ({how}{note}).</sub>\n"


def render_text(text: str, results: Path, root: Path) -> str:
    """`text` with every results block re-rendered from ``results/<NAME>.json`` (idempotent)."""

    def block(m: re.Match) -> str:
        name, tab = m.group(1), m.group(2)
        path = results / f"{name}.json"
        if not path.exists():
            raise FileNotFoundError(f"results block {name}:{tab} needs {path}: run what writes it (docs/index.md)")
        doc = json.loads(path.read_text())
        if tab not in doc.get("tables", {}):
            raise KeyError(f"{path} has no table {tab!r} (tables: {', '.join(doc.get('tables', {}))})")
        body = render_table(doc, tab, path.relative_to(root).as_posix())
        return f"<!-- results:{name}:{tab} -->\n{body}<!-- /results:{name}:{tab} -->"

    return MARKER.sub(block, text)


def render_docs(root: str | Path, write: bool = True) -> list[Path]:
    """Re-render the results blocks of every ``docs/*.md`` under `root` from ``root/results``; returns the
    files whose text changed (written when `write`)."""
    root = Path(root)
    changed = []
    for doc in sorted((root / "docs").glob("*.md")):
        old = doc.read_text()
        new = render_text(old, root / "results", root)
        if new != old:
            changed.append(doc)
            if write:
                write_atomic(doc, new)
    return changed


def blocks(text: str) -> list[tuple[str, str]]:
    """(results name, table) of every results block in `text`."""
    return [(m.group(1), m.group(2)) for m in MARKER.finditer(text)]
