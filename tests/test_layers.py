"""The package graph is layered: a module imports only from its own package or from lower layers, so the
graph has no cycles (parsed from the source, so an import inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import streamalign

ROOT = Path(streamalign.__file__).resolve().parent

# lowest first; one entry per top-level package or module of streamalign
LAYERS = [
    {"__init__"},
    {"io", "optim", "extras", "distributed", "registry"},
    {"schemas"},
    {"models"},
    {"adapters"},
    {"pipeline"},
    {"plan"},
    {"rewards"},
    {"buffer"},
    {"worlds"},
    {"scoring"},
    {"collect"},
    {"generate"},
    {"train"},
    {"evaluate"},
    {"cli"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module(path: Path, root: Path = ROOT) -> list[str]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every streamalign import in a file."""
    mod = _module(path, root)
    pkg = mod if path.name == "__init__.py" else mod[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [_submodule(root, target, a.name) for a in node.names]
            else:
                names = [node.module or ""]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, n) for line, n in out if n == "streamalign" or n.startswith("streamalign.")]


def _submodule(root: Path, package: str, name: str) -> str:
    """``from package import name``: the submodule when `name` is one, else the package (an attribute)."""
    folder = root.parent.joinpath(*package.split("."), name)
    return f"{package}.{name}" if folder.with_suffix(".py").exists() or folder.is_dir() else package


def _top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").exists()}  # fmt: skip
    assert tops <= set(LEVEL), f"packages without a layer: {sorted(tops - set(LEVEL))}"


def test_imports_follow_the_layer_order():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        own = _top(".".join(_module(path)))
        for line, target in _imports(path):
            other = _top(target)
            if other != own and LEVEL[other] >= LEVEL[own]:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({other} is not below {own})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    probe = tmp_path / "streamalign" / "rewards" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import streamalign.io\nfrom . import pixel\n\ndef f():\n    from ..worlds.shapes import world\n")
    (probe.parent / "pixel.py").write_text("")
    found = _imports(probe, tmp_path / "streamalign")
    assert found == [(1, "streamalign.io"), (2, "streamalign.rewards.pixel"), (5, "streamalign.worlds.shapes")]
    assert LEVEL[_top(found[2][1])] > LEVEL["rewards"]  # the lazy import of a higher layer is caught
