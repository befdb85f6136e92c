"""Render the measured tables in docs/*.md from results/*.json (between ``<!-- results:NAME:TABLE -->`` and
``<!-- /results:NAME:TABLE -->``); a re-measurement is then a data commit: run the bench or experiment
(its ``--json-out`` defaults to or names ``results/NAME.json``), then this script.

    python bench/render_results.py           # rewrite the docs whose tables are out of date
    python bench/render_results.py --check   # exit 1 naming them, write nothing (tests/test_readme.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamalign.io.results import render_docs

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report docs whose tables differ from results/")
    args = ap.parse_args()
    changed = render_docs(ROOT, write=not args.check)
    for path in changed:
        print(f"{'out of date' if args.check else 'rendered'}: {path.relative_to(ROOT)}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
