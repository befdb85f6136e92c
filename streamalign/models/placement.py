"""Where and in what precision a stage's models run: the :class:`~streamalign.schemas.sections.Hardware`
section (``--device``, ``--dtype``, ``--text-offload``, ``--threads``, ``--compile``) resolved to a torch device
and dtype (and whether the generator's blocks are compiled, :mod:`streamalign.models.compiled`).

``auto`` device: ``cuda:LOCAL_RANK`` when CUDA is available (one GPU per torchrun rank), else ``cpu``;
``auto`` dtype: bfloat16 on CUDA, float32 on CPU (so every CPU number stays what it was).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..schemas.sections import DtypeName, Hardware, TextOffload

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bf16' (the names of ``--dtype``)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def resolve_device(spec: str) -> torch.device:
    """'auto': cuda:LOCAL_RANK when CUDA is available, else cpu; 'cuda' under a launcher (``LOCAL_RANK``
    set: torchrun, accelerate) is also this rank's own GPU, not GPU 0 for every rank; a CUDA device on a
    machine without one is a clear error."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: CUDA is not available on this machine (use cpu or auto)")
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(spec)


def resolve_dtype(name: DtypeName, device: torch.device | str) -> torch.dtype:
    """'auto': bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """A resolved Hardware section: the device and compute dtype of generator, text encoder and VAE."""

    device: torch.device = CPU
    dtype: torch.dtype = torch.float32
    text_offload: TextOffload = "auto"
    compile: bool = False  # torch.compile the generator's transformer blocks (models/compiled.py)

    @classmethod
    def of(cls, hw: Hardware, apply_threads: bool = True) -> Placement:
        """Resolve `hw` (and set torch's CPU threads when it names them)."""
        if apply_threads and hw.threads:
            torch.set_num_threads(hw.threads)
        device = resolve_device(hw.device)
        return cls(device, resolve_dtype(hw.dtype, device), hw.text_offload, hw.compile)


CPU_FP32 = Placement()  # what every stage ran on before --device / --dtype (and still does on a CPU)
