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
    load_generator,
    merge_lora,
    read_adapter,
    read_lora,
    save_safetensors,
)
from ..schemas.config import ModelConfig

_A, _B = ".lora_A.weight", ".lora_B.weight"


def combine_adapters(adapters: Sequence[tuple[str | Path, float]], out: str | Path) -> Path:
    """Write ONE peft adapter folder whose delta is ``sum_i s_i (alpha_i / r_i) B_i A_i`` for the given
    (folder, scale) pairs. Modules missing from an adapter contribute zeros. Atomic (temp + rename)."""
    if not adapters:
        raise ValueError("combine_adapters needs at least one adapter")
    loaded = [(*read_adapter(f), float(s)) for f, s in adapters]
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


def merged_generator(
    config: str | ModelConfig, checkpoint: str | Path | None, adapters: Sequence[tuple[str | Path, float]]
) -> torch.nn.Module:
    """The base generator with every (adapter folder, scale) merged into its weights (float64 sums)."""
    model = load_generator(config, checkpoint)
    for folder, s in adapters:
        weights, alpha = read_lora(folder)
        merge_lora(model, weights, alpha=alpha, scale=float(s))
    return model


def save_merged_weights(
    config: str | ModelConfig, checkpoint: str | Path | None, adapters: Sequence[tuple[str | Path, float]], path: Path
) -> Path:
    """Full merged weights as .safetensors, loadable with ``--checkpoint`` by every command."""
    save_safetensors(merged_generator(config, checkpoint, adapters).state_dict(), path)
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
