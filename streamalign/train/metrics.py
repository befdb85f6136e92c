"""Training metrics: JSONL always, TensorBoard when installed, W&B on request (curves: train/health.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..extras import available, require
from ..io.files import append_line, write_atomic

METRICS = "metrics.jsonl"


class MetricsLog:
    """Append one JSON row per update to ``metrics.jsonl`` (rank 0). On resume the rows after the
    checkpoint's step are dropped first, so the log matches an uninterrupted run."""

    def __init__(self, out: Path, resume_step: int | None = None, config: dict | None = None, wandb: bool = False):
        self.path = out / METRICS
        if resume_step is None:
            write_atomic(self.path, "")
        else:
            rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if self.path.exists() else []
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        self.tb = None
        if available("tensorboard"):  # the [tensorboard] extra; events after the checkpoint are purged on resume
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
        self.wandb = None
        if wandb:  # WANDB_PROJECT / WANDB_MODE / WANDB_* are read by wandb; the run id is kept for resumes
            wb = require("wandb", "wandb", "--wandb")
            id_file = out / "wandb-run-id"
            resumed = resume_step is not None and id_file.exists()
            run_id = id_file.read_text().strip() if resumed else wb.util.generate_id()
            write_atomic(id_file, run_id)
            self.wandb = wb.init(project=os.environ.get("WANDB_PROJECT", "streamalign"), config=config or {},
                                 dir=str(out), id=run_id, resume="allow")  # fmt: skip

    def log(self, row: dict) -> None:
        append_line(self.path, json.dumps(row))
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; one line naming the file and line of a damaged row."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {n}: not a JSON row (a damaged metrics log)") from None
    return rows
