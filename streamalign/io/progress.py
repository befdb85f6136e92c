"""Progress bars: tqdm, hidden when the caller says so or when ``TQDM_DISABLE`` is set (``--quiet``)."""

from __future__ import annotations

import os
from typing import Any

from tqdm import tqdm


def progress_bar(*args: Any, show: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar; ``show=False`` or ``TQDM_DISABLE=1`` in the environment hides it."""
    off = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(*args, disable=off or not show, **kwargs)
