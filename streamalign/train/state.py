"""Training checkpoints: adapter (peft format), optimizer, RNG states and data position, written
atomically as one folder ``checkpoints/step-NNNNNNN``; the newest complete one is what ``--resume`` loads.
Nothing is unpickled: the optimizer state is read with ``torch.load(weights_only=True)`` (a pickled one is
one clear error), and a damaged file is one error naming it."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import save_file

from ..adapters.lora import save_lora
from ..io.files import staged_folder
from ..models.checkpoint import read_adapter, read_tensors

CHECKPOINTS = "checkpoints"


@dataclass
class Progress:
    """Where training stands: updates done, and the data position (semi: epoch and entries consumed in
    it on this rank; on: iterations finished)."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    iteration: int = 0


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}"


def save_checkpoint(
    out: Path, peft_model: PeftModel, opt: torch.optim.Optimizer, progress: Progress, objective=None, keep: int = 2
) -> Path:
    """Write checkpoint `progress.step` (rank 0 only); keep the newest `keep` checkpoints. An objective with
    a state (NFT: old / reference weights, kappa) is saved beside it."""
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
    done = sorted((out / CHECKPOINTS).glob("step-*"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted((out / CHECKPOINTS).glob("step-*")) if (out / CHECKPOINTS).exists() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, peft_model: PeftModel, opt: torch.optim.Optimizer, objective=None) -> Progress:
    """Restore adapter weights, optimizer, RNG state (and the objective's state) from a checkpoint folder;
    returns its progress."""
    weights = read_adapter(path / "adapter")[1]
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"checkpoint {path} has LoRA weights this run's adapter lacks: {unexpected[:3]}")
    opt.load_state_dict(read_tensors(path / "optimizer.pt"))
    torch.set_rng_state(read_tensors(path / "rng.safetensors")["torch"])
    if objective is not None and objective.state_dict() is not None:
        if not (path / "objective.safetensors").exists():
            raise ValueError(f"checkpoint {path} has no objective state: it was written by another objective")
        dev = next(iter(peft_model.parameters())).device
        tensors = {k: v.to(dev) for k, v in read_tensors(path / "objective.safetensors").items()}
        objective.load_state_dict(tensors, read_json(path / "objective.json"))
    return Progress(**read_json(path / "progress.json", Progress))


def read_json(file: Path, fields: type | None = None) -> dict:
    """A checkpoint's JSON file (holding the keys of the dataclass `fields`, if given); one clear error
    naming the file when it is missing or damaged."""
    try:
        data = json.loads(file.read_text())
        if fields is not None:
            fields(**data)
        return data
    except (OSError, ValueError, TypeError) as e:  # missing, not JSON, or not the fields
        raise ValueError(f"checkpoint file {file} is missing or damaged ({str(e).splitlines()[0]}): resume from "
                         "another checkpoint (delete this one) or start a new --out") from None
