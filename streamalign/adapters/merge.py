"""Exact LoRA merging and the merge-scale selection rule (DESIGN "Merge and selection").

``W = W0 + sum_i s_i dW_i`` with ``dW_i = (alpha_i / r_i) B_i A_i``. peft's "linear" combination
averages A and B separately (so its product has cross terms); here the adapters are concatenated along
the rank instead: ``A = [A_1; A_2]``, ``B = [c_1 B_1, c_2 B_2]`` with ``c_i = s_i alpha_i / r_i`` and
alpha = r (scaling 1), whose product is exactly the sum.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..io.files import staged_folder
from ..models.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointError,
    load_generator,
    lora_pairs,
    merge_lora,
    read_adapter,
    read_lora,
    save_safetensors,
)
from ..models.protocol import get_family
from ..schemas.config import ModelConfig

_A, _B = ".lora_A.weight", ".lora_B.weight"


def combine_adapters(
    adapters: Sequence[tuple[str | Path, float]],
    out: str | Path,
    model: torch.nn.Module | str | ModelConfig | None = None,
) -> Path:
    """Write ONE peft adapter folder whose delta is ``sum_i s_i (alpha_i / r_i) B_i A_i`` for the given
    (folder, scale) pairs. Modules missing from an adapter contribute zeros. Atomic (temp + rename).

    Refused (one line naming the folder): a config rank ``r`` that disagrees with the weights' rank, per-module
    rank / alpha patterns, and modules that are not Linear layers of `model` (a module, or a config whose
    generator is built on the meta device) or, without one, whose shapes differ from another adapter's."""
    if not adapters:
        raise ValueError("combine_adapters needs at least one adapter")
    loaded = [(*read_adapter(f), float(s)) for f, s in adapters]
    check_adapter_modules([f for f, _ in adapters], [w for _, w, _ in loaded], model)
    for (f, _), (cfg, _, _) in zip(adapters, loaded, strict=True):
        if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
            raise ValueError(f"adapter {f}: per-module rank_pattern / alpha_pattern are not supported by merge")
    modules = sorted({k[: -len(_A)] for _, sd, _ in loaded for k in sd if k.endswith(_A)})
    ranks = [int(cfg["r"]) for cfg, _, _ in loaded]
    total = sum(ranks)
    shapes = {m: (w[m + _A].shape[1], w[m + _B].shape[0]) for _, w, _ in loaded for m in modules if m + _A in w}
    sd: dict[str, torch.Tensor] = {}
    for m in modules:
        a_parts, b_parts = [], []
        for (cfg, w, s), r in zip(loaded, ranks, strict=True):
            if m + _A in w:
                a, b = w[m + _A].double(), w[m + _B].double()
            else:  # this adapter does not touch the module: zero rows / columns keep the sum exact
                a, b = (
                    torch.zeros(r, shapes[m][0], dtype=torch.float64),
                    torch.zeros(shapes[m][1], r, dtype=torch.float64),
                )
            a_parts.append(a)
            b_parts.append(b * (s * float(cfg["lora_alpha"]) / r))
        sd[m + _A] = torch.cat(a_parts).float().contiguous()
        sd[m + _B] = torch.cat(b_parts, dim=1).float().contiguous()
    cfg = dict(loaded[0][0])
    targets = sorted({t for c, _, _ in loaded for t in (c.get("target_modules") or [])})
    cfg.update(r=total, lora_alpha=float(total), target_modules=targets, rank_pattern={}, alpha_pattern={})
    with staged_folder(out) as tmp:
        save_file(sd, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))
    return Path(out)


def check_adapter_modules(
    folders: Sequence[str | Path], weights: Sequence[Mapping[str, torch.Tensor]],
    model: torch.nn.Module | str | ModelConfig | None,
) -> None:  # fmt: skip
    """Every adapter's modules must be Linear layers of the generator (`model`), with matching shapes; without
    a model, a module two adapters share must have the same shape in both."""
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            cfg = ModelConfig.load(model) if isinstance(model, str) else model
            with torch.device("meta"):  # names and shapes only: no memory, no init
                model = get_family(cfg.arch.family).build(cfg.arch)
        for folder, w in zip(folders, weights, strict=True):
            try:
                lora_pairs(model, w)
            except CheckpointError as e:
                raise CheckpointError(f"adapter {folder} does not belong to this generator: {e}") from None
        return
    seen: dict[str, tuple[tuple[int, int], str | Path]] = {}
    for folder, w in zip(folders, weights, strict=True):
        for k, a in w.items():
            if not k.endswith(_A):
                continue
            m, b = k[: -len(_A)], w.get(k[: -len(_A)] + _B)
            if b is None:
                raise CheckpointError(f"adapter {folder}: '{m}' has lora_A but no lora_B")
            shape = (a.shape[1], b.shape[0])
            first = seen.setdefault(m, (shape, folder))
            if first[0] != shape:
                raise CheckpointError(
                    f"adapter {folder}: module '{m}' is {shape[0]}->{shape[1]} but {first[1]} has it "
                    f"{first[0][0]}->{first[0][1]}: adapters of different generators"
                )


def merged_generator(
    config: str | ModelConfig, checkpoint: str | Path | None, adapters: Sequence[tuple[str | Path, float]],
    base_lora: str | Path | None = None, base_lora_alpha: float | None = None,
) -> torch.nn.Module:
    """The base generator (with the model's shipped LoRA, when given) with every (adapter folder, scale)
    merged into its weights (float64 sums)."""
    model = load_generator(config, checkpoint, base_lora=base_lora, base_lora_alpha=base_lora_alpha)
    for folder, s in adapters:
        weights, alpha = read_lora(folder)
        merge_lora(model, weights, alpha=alpha, scale=float(s))
    return model


def save_merged_weights(
    config: str | ModelConfig, checkpoint: str | Path | None, adapters: Sequence[tuple[str | Path, float]], path: Path,
    base_lora: str | Path | None = None, base_lora_alpha: float | None = None,
) -> Path:
    """Full merged weights as .safetensors, loadable with ``--checkpoint`` by every command (a model that
    ships a LoRA: with ``--base-lora none``, the LoRA is in them)."""
    save_safetensors(merged_generator(config, checkpoint, adapters, base_lora, base_lora_alpha).state_dict(), path)
    return path


@dataclass(frozen=True)
class Selection:
    scale: float | None  # None: no scale qualifies, the base model is kept
    reason: str


def select_scale(
    rows: Mapping[float, Mapping[str, float]],
    base: Mapping[str, float],
    in_domain: str = "composite",
    ood: str = "background_cleanliness",
    ood_tolerance: float = 0.0,
) -> Selection:
    """The dual criterion: the LARGEST scale whose in-domain mean beats the base AND whose OOD metric is
    not below the base's by more than `ood_tolerance`. rows: scale -> metric means."""
    ok = [s for s, r in rows.items() if r[in_domain] > base[in_domain] and r[ood] >= base[ood] - ood_tolerance]
    if not ok:
        return Selection(None, f"no scale improves {in_domain} without lowering {ood}: the base model is kept")
    s = max(ok)
    return Selection(
        s,
        f"largest scale with {in_domain} {rows[s][in_domain]:.4f} > base {base[in_domain]:.4f} and {ood} "
        f"{rows[s][ood]:.4f} >= base {base[ood]:.4f} - {ood_tolerance}",
    )
