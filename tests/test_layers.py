"""The package graph is layered: a module imports only from its own package or from lower layers, so the
graph has no cycles between packages; and no module imports itself through others, within a package too
(parsed from the source, so an import inside a function counts too)."""

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
    {"rewards"},
    {"plan"},
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


def _module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the streamalign modules it imports (a package's ``__init__`` is the package's name; an
    imported attribute counts as its module), every import in the file, at module level or inside a function."""
    mods = {".".join(_module(p, root)): p for p in sorted(root.rglob("*.py"))}

    def resolve(name: str) -> str:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    return {m: {resolve(t) for _, t in _imports(p, root)} - {m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, by a plain depth-first search from each
    module: a module is in a cycle with every module that both reaches it and is reached by it."""
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {m: reach(m) for m in graph}
    comps = {frozenset({m} | {o for o in reached[m] if m in reached[o]}) for m in graph}
    return sorted(sorted(c) for c in comps if len(c) > 1)


def test_no_module_imports_itself_through_others():
    """No import circle between modules, within a package too, lazy imports included."""
    assert _cycles(_module_graph()) == []


def test_the_cycle_check_sees_a_circle_dodged_inside_a_function(tmp_path):
    pkg = tmp_path / "streamalign" / "train"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "loop.py").write_text("from .plan import plan_train\n")
    (pkg / "plan.py").write_text("def plan_train():\n    from .memory import run\n")
    (pkg / "memory.py").write_text("from .loop import Trainer\n")
    (pkg / "other.py").write_text("from . import loop\n")
    found = _cycles(_module_graph(tmp_path / "streamalign"))
    assert found == [["streamalign.train.loop", "streamalign.train.memory", "streamalign.train.plan"]]
