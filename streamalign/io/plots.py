"""The one plotting set-up: matplotlib on its file-only backend (no display needed), figures saved and
closed in one call. Every report's PNG goes through here."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def subplots(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots`` on the Agg backend: (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Tight layout, write `path` (PNG), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")  # explicit: an atomic write's temporary name has no .png
    plt.close(fig)
    return Path(path)
