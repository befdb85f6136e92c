"""The README's documented API snippet runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_conformance_snippet_runs():
    text = README.read_text()
    m = re.search(r"<!-- conformance-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its conformance snippet"
    r = subprocess.run([sys.executable, "-c", m.group(1)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 12, 16, 8, 8])" in r.stdout


def test_cli_help_lists_only_real_commands():
    r = subprocess.run([sys.executable, "-m", "streamalign.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "model" in r.stdout
