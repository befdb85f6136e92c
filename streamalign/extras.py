"""Optional dependencies (pyproject extras): import them with one clear line when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import `module` or fail with: what needs it and the install command of its extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs the '{module}' package: pip install 'streamalign[{extra}]'") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
