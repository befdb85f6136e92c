"""Where a bench script writes its measured tables (``results/<name>.json``) and what it records of the run."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def add_json_out(ap: argparse.ArgumentParser, name: str) -> None:
    """``--json-out FILE`` (default ``results/<name>.json``, the file the docs' tables are rendered from)."""
    ap.add_argument("--json-out", type=Path, default=ROOT / "results" / f"{name}.json",
                    help=f"Write the measured tables here (default: results/{name}.json; then run "
                    "python bench/render_results.py).")  # fmt: skip


def save(args: argparse.Namespace, tables: dict[str, dict], data: object = None, path: Path | None = None) -> None:
    """Write `tables` (``streamalign.io.results.table``) with the command and the machine to `path`
    (default ``--json-out``)."""
    import torch  # here, not above: bench_memory's workers import this module against older code

    from streamalign.io.results import write_results
    from streamalign.schemas.run import provenance

    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    meta = {**provenance(" ".join(["python", shown.as_posix(), *sys.argv[1:]])), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine()}  # fmt: skip
    print(f"wrote {write_results(path or args.json_out, meta, tables, data)}")
