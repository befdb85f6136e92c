"""Which run a training folder holds. ``--resume`` continues only the run whose resolved config
``run.yaml`` records (a refusal names every setting that differs); a fresh run never starts in a folder
holding an earlier run's checkpoints, nor another run's on-policy rollouts (the same run restarted
before its first checkpoint reuses its own: a run is deterministic), unless ``--overwrite`` replaces
that run. Checked before any model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml

from ..io.files import remove_path
from ..io.outputs import MARKER, is_empty
from ..schemas.run import RUN_FILE, differences
from .config import TrainConfig
from .state import CHECKPOINTS, checkpoints

# settings a resume may change: how long to train, whether damaged shards are skipped (a run that met
# none reads the same data either way; one that met one stopped there) and whether recorded plug-ins are
# trusted (the plug-ins themselves are compared, with their files' hashes)
RESUME_MAY_CHANGE = frozenset({"schedule.steps", "data.skip_damaged", "rollouts.trust_plugins"})
ROLLOUTS = "rollouts"

Resume = bool | Literal["auto"]


def check_run_folder(out: Path, cfg: TrainConfig, resume: Resume, overwrite: bool = False) -> bool:
    """Refuse a run that would mix with another one in `out`; returns whether it resumes (``resume="auto"``:
    when `out` holds checkpoints). One clear line for every refusal."""
    found = checkpoints(out)
    if resume == "auto":
        resume = bool(found)
    if not resume:
        if overwrite:
            return False
        if found:
            raise ValueError(f"{out} holds an earlier training run's checkpoints (newest {found[-1].name}): pass "
                             "--resume to continue it, --overwrite to replace it, or use another --out")  # fmt: skip
        rollouts = out / ROLLOUTS
        if rollouts.is_dir() and any(rollouts.iterdir()):  # reusable only by the same run, restarted
            saved = out / RUN_FILE
            changed = differences(saved_config(saved), cfg, RESUME_MAY_CHANGE, was="run.yaml") \
                if saved.is_file() else [f"{saved} is missing"]  # fmt: skip
            if changed:
                raise ValueError(f"{out} holds the on-policy rollouts of another run ({'; '.join(changed)}): "
                                 "--overwrite replaces that run, or use another --out")  # fmt: skip
        return False
    if overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    saved = out / RUN_FILE
    if not found:
        raise ValueError(f"--resume: {out} holds no checkpoint to continue from (none in {out / CHECKPOINTS}): "
                         "run without --resume to start")  # fmt: skip
    if not saved.is_file():
        raise ValueError(f"--resume: {saved} is missing, so the checkpoints in {out} cannot be matched to this "
                         "run's settings: restore it, or start a new run in another --out")  # fmt: skip
    changed = differences(saved_config(saved), cfg, RESUME_MAY_CHANGE, was="run.yaml")
    if changed:
        raise ValueError(f"--resume: {out} was trained with other settings: {'; '.join(changed)}; resume with "
                         f"the same settings (--run-config {saved}) or use another --out")  # fmt: skip
    return True


def saved_config(saved: Path) -> TrainConfig:
    """The resolved config a training run recorded in its ``run.yaml``."""
    try:
        meta = (yaml.safe_load(saved.read_text()) or {}).get("streamalign", {})
    except (yaml.YAMLError, AttributeError):
        meta = {}
    stage = meta.get("stage", "train") if isinstance(meta, dict) else "train"
    if stage != "train":
        raise ValueError(f"--resume: {saved} records a `{stage}` run, not a training run: use another --out")
    return TrainConfig.build(saved)


class UnfinishedRun:
    """What a training run that fails leaves in its folder: before its first checkpoint (its first durable
    result) nothing it wrote (marker, run.yaml, an empty metrics.jsonl, rollouts: nothing for --resume to
    use); after one, everything (--resume continues from it). Armed by rank 0 once the folder is open, with
    the entries the folder held before this run wrote there (kept either way)."""

    def __init__(self, out: Path) -> None:
        self.out, self.kept = Path(out), None

    def arm(self, kept: set[str]) -> None:
        self.kept = kept

    def __enter__(self) -> UnfinishedRun:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None or self.kept is None or checkpoints(self.out) or not self.out.is_dir():
            return
        for entry in self.out.iterdir():
            if entry.name not in self.kept and entry.name != MARKER:
                remove_path(entry)
        if not self.kept and is_empty(self.out):
            (self.out / MARKER).unlink(missing_ok=True)
