"""The one plotting set-up: matplotlib on its file-only backend (no display needed), figures saved and
closed in one call. Every report's PNG goes through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_path


def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` on the Agg backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Tight layout, write `path` (PNG) atomically, close the figure."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:  # never half a PNG (a full disk)
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.removeprefix(".") or "png")
    finally:
        plt.close(fig)
    return Path(path)
