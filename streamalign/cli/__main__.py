"""``python -m streamalign.cli`` (e.g. under ``torchrun -m streamalign.cli``)."""

from . import app

app()
