"""Training checkpoints: adapter (peft format), optimizer, RNG states and data position, written
atomically as one folder ``checkpoints/step-NNNNNNN`` with the sha256 of every file in ``checksums.json``;
the newest intact one is what ``--resume`` loads (a damaged newest one falls back to the previous one,
with a warning). Older checkpoints are pruned only after the new one is durable (fsynced and renamed
into place), and only those older than it. Nothing is unpickled: the optimizer state is read with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..adapters.lora import save_lora
from ..io.files import checksum, fsync_path, remove_stale, staged_folder, tree_files
from ..models.checkpoint import CheckpointError, read_adapter

CHECKPOINTS = "checkpoints"
CHECKSUMS = "checksums.json"
log = logging.getLogger("streamalign.train")


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated, altered or unreadable."""


@dataclass
class Progress:
    """Where training stands: updates done, and the data position (semi: epoch and entries of the
    buffer's stream consumed in it, the same on every rank; on: iterations finished)."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    iteration: int = 0


@dataclass
class CheckpointData:
    """A checkpoint read into memory and verified, not yet applied."""

    path: Path
    adapter: dict[str, torch.Tensor]
    optimizer: dict
    rng: torch.Tensor
    progress: Progress
    objective: tuple[dict[str, torch.Tensor], dict] | None


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return sorted((out / CHECKPOINTS).glob("step-*")) if (out / CHECKPOINTS).is_dir() else []


def save_checkpoint(
    out: Path, peft_model: PeftModel, opt: torch.optim.Optimizer, progress: Progress, objective=None, keep: int = 2
) -> Path:
    """Write checkpoint `progress.step` (rank 0 only); then keep it and the newest `keep - 1` older ones.
    An objective with a state (NFT: old / reference weights, kappa) is saved beside it."""
    final = checkpoint_dir(out, progress.step)
    with staged_folder(final) as tmp:
        save_lora(peft_model, tmp / "adapter")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)))
        state = objective.state_dict() if objective is not None else None
        if state is not None:
            tensors, meta = state
            tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            save_file(tensors, str(tmp / "objective.safetensors"))
            (tmp / "objective.json").write_text(json.dumps(meta))
        sums = {str(f.relative_to(tmp)): checksum(f) for f in tree_files(tmp)}  # read back: what is on disk
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))
        for f in tree_files(tmp):
            fsync_path(f)
    fsync_path(final.parent)
    remove_stale(final.parent)  # what killed runs left while saving or pruning
    older = [c for c in checkpoints(out) if c.name < final.name]
    for old in older[: max(0, len(older) - (keep - 1))]:  # never the new one, never a newer one
        gone = old.with_name(f".{old.name}.old-{os.getpid()}")
        os.replace(old, gone)  # out of sight at once: a kill mid-delete leaves no partial checkpoint
        shutil.rmtree(gone, ignore_errors=True)
    return final


def read_checkpoint(path: Path, with_objective: bool = False) -> CheckpointData:
    """Read and verify every file of a checkpoint (against ``checksums.json`` when it has one); a
    DamagedCheckpointError names the first bad file."""
    objective = None
    if with_objective and (path / "objective.safetensors").exists():
        objective = (_read(path / "objective.safetensors", lambda p: load_file(str(p))),
                     _read(path / "objective.json", lambda p: json.loads(p.read_text())))  # fmt: skip
    data = CheckpointData(
        path=path,
        adapter=_read(path / "adapter", lambda p: read_adapter(p)[1]),
        optimizer=_read(path / "optimizer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
        rng=_read(path / "rng.safetensors", lambda p: load_file(str(p))["torch"]),
        progress=_read(path / "progress.json", lambda p: Progress(**json.loads(p.read_text()))),
        objective=objective,
    )
    # the reads first (they name what is wrong: pickled, not a tensor file, ...), then the checksums (which
    # catch what still reads: truncated or altered bytes)
    sums_file = path / CHECKSUMS
    if sums_file.is_file():
        sums = _read(sums_file, lambda p: json.loads(p.read_text()))
        for rel, digest in sorted(sums.items()):
            if not (path / rel).is_file():
                raise DamagedCheckpointError(f"{path / rel} is missing")
            if checksum(path / rel) != digest:
                raise DamagedCheckpointError(f"{path / rel} does not match its checksum (truncated or altered)")
    return data


def _read(path: Path, load):
    """`load(path)`, any failure to read or decode it a one-line DamagedCheckpointError naming the file."""
    if not path.exists():
        raise DamagedCheckpointError(f"{path} is missing")
    try:
        return load(path)
    except pickle.UnpicklingError:
        raise DamagedCheckpointError(
            f"{path} holds pickled Python objects (streamalign never unpickles: save tensors only)"
        ) from None
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, TypeError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(f"{path} cannot be read ({reason})") from None


def apply_checkpoint(data: CheckpointData, peft_model: PeftModel, opt: torch.optim.Optimizer, objective=None
                     ) -> Progress:  # fmt: skip
    """Restore adapter weights, optimizer, RNG state (and the objective's state); returns the progress."""
    result = set_peft_model_state_dict(peft_model, data.adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"checkpoint {data.path} has LoRA weights this run's adapter lacks: {unexpected[:3]}")
    opt.load_state_dict(data.optimizer)
    torch.set_rng_state(data.rng)
    if objective is not None and objective.state_dict() is not None:
        if data.objective is None:
            raise ValueError(f"checkpoint {data.path} has no objective state: it was written by another objective")
        dev = next(iter(peft_model.parameters())).device
        tensors, meta = data.objective
        objective.load_state_dict({k: v.to(dev) for k, v in tensors.items()}, meta)
    return data.progress


def resume_checkpoint(out: Path, peft_model: PeftModel, opt: torch.optim.Optimizer, objective=None) -> Progress:
    """Restore the newest intact checkpoint of `out`, falling back over damaged ones with a warning."""
    found = checkpoints(out)
    problems = []
    for path in reversed(found):
        try:
            data = read_checkpoint(path, objective is not None)
        except DamagedCheckpointError as e:
            problems.append(str(e))
            log.warning("checkpoint %s is damaged (%s): falling back to an older one", path.name, e)
            continue
        if problems:
            log.warning("resuming from %s (step %d)", path.name, data.progress.step)
        return apply_checkpoint(data, peft_model, opt, objective)
    raise CheckpointError(f"--resume: no intact checkpoint in {out / CHECKPOINTS} ({'; '.join(problems) or 'none'}): "
                          "start a new run")  # fmt: skip
