"""Load released generator checkpoints strictly into a registered model family (the Wan DiT) without unpickling.

Supported: Self-Forcing / Causal-Forcing ``.pt`` (``{"generator": sd, "generator_ema": sd}``, keys prefixed
``model.``), trainer wrappers (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``,
``diffusion_model.``) anywhere in a key, bare state dicts, ``.safetensors`` (Krea realtime 14B; a
directory of shards with an index works too), and LongLive's LoRA (``{"generator_lora": peft_sd}``),
merged exactly into the base weights: ``W += scale * (alpha / r) * B @ A``.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..io.files import atomic_path
from ..schemas.config import ModelConfig
from . import wan  # noqa: F401  (registers the wan family)
from .protocol import ChunkModel, get_family, normalize_key


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model config."""


def _read_raw(path: Path, mmap: bool = True) -> Mapping:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of a local .pt/.safetensors file")
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"checkpoint directory {path} holds no .safetensors files")
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(str(s)))
        return out
    if path.suffix != ".safetensors" and _is_legacy_torch_file(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is in torch's legacy (pre-1.6, non-zip) format, which cannot be "
            "memory-mapped; re-save its tensors as .safetensors or with a current torch.save (zip format)"
        )
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch (zip) checkpoint or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(
                f"cannot read checkpoint {path}: {_first_line(e)} (not a torch or safetensors file?)"
            ) from None
        found = _UNSUPPORTED_GLOBAL.search(str(e))  # holds Python objects besides tensors: never unpickled
        what = f" ({found[1]})" if found else ""
        raise CheckpointError(
            f"cannot read checkpoint {path}: it holds pickled Python objects{what} besides tensors, and "
            "streamalign never unpickles; re-save only the tensors (the state dict) as .safetensors"
        ) from None
    except Exception as e:  # unreadable or truncated
        hint = "damaged or truncated?" if path.suffix == ".safetensors" else "damaged, or not a tensors-only .pt?"
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)} ({hint})") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
# torch.save's legacy format: a protocol-2 pickle whose first object is this magic number (torch/serialization.py)
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def read_tensors(path: str | Path) -> Mapping:
    """A tensors-only torch file (e.g. an optimizer state) read into memory, never unpickled: one clear
    error for a missing, damaged or pickled file."""
    return _read_raw(Path(path), mmap=False)


def _first_line(e: Exception) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def read_state_dict(
    path: str | Path, which: str = "auto", key_adapter: Callable[[str], str] = normalize_key
) -> dict[str, torch.Tensor]:
    """The generator's bare state dict from a checkpoint file (keys mapped by the family's `key_adapter`).

    which: ``generator`` / ``generator_ema`` (Self-Forcing style files) or ``auto`` (``generator_ema`` if
    present, else ``generator``, else ``model``/``state_dict``, else the file itself).
    """
    raw = _read_raw(Path(path))
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    if which != "auto":
        if which not in raw:
            raise CheckpointError(f"checkpoint {path} has no '{which}' entry (top-level keys: {list(raw)[:8]})")
        raw = raw[which]
    else:
        for name in ("generator_ema", "generator", "model", "state_dict"):
            if name in raw and isinstance(raw[name], Mapping):
                raw = raw[name]
                break
    sd = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: entry '{k}' is not a tensor")
        sd[key_adapter(k)] = v
    return sd


def _describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_state_dict_strict(
    model: ChunkModel, sd: Mapping[str, torch.Tensor], source: str, config_name: str
) -> None:
    """Copy `sd` into `model`; any missing/unexpected key, shape mismatch or non-floating tensor for a floating
    parameter is a CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    # a non-floating tensor (int32, bool, ...) would be cast silently into a floating parameter
    bad_dtype = [
        f"{k} is {_dtype_name(sd[k].dtype)}, the model expects floating {_dtype_name(own[k].dtype)}"
        for k in own
        if k in sd and own[k].is_floating_point() and not sd[k].is_floating_point()
    ]
    if missing or unexpected or bad_shape or bad_dtype:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_describe(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatch {len(bad_shape)}: {_describe(bad_shape, 3)}")
        if bad_dtype:
            parts.append(f"dtype mismatch {len(bad_dtype)}: {_describe(bad_dtype, 3)}")
        a = model.arch
        raise CheckpointError(
            f"checkpoint {source} does not match model config '{config_name}' (dim {a.dim}, {a.num_layers} layers, "
            f"{a.num_heads} heads, ffn {a.ffn_dim}, text_dim {a.text_dim}): " + "; ".join(parts)
        )
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def lora_pairs(
    model: torch.nn.Module, lora_sd: Mapping[str, torch.Tensor]
) -> list[tuple[str, torch.nn.Linear, torch.Tensor, torch.Tensor]]:
    """Match peft-format LoRA weights to the model's Linear layers: (name, layer, A, B) per target, or a
    CheckpointError naming the entry that is not a LoRA weight, lacks its pair or does not fit."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in lora_sd.items():
        m = _LORA_KEY.match(normalize_key(k))
        if m is None:
            raise CheckpointError(f"LoRA entry '{k}' is not a peft lora_A/lora_B weight")
        pairs.setdefault(m["mod"], {})[m["ab"]] = v
    modules = dict(model.named_modules())
    out = []
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA for '{name}' lacks lora_{'B' if 'A' in ab else 'A'}")
        lin = modules.get(name)
        if not isinstance(lin, torch.nn.Linear):
            raise CheckpointError(f"LoRA targets '{name}', which is not a Linear layer of this model")
        a, b = ab["A"], ab["B"]
        if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"LoRA for '{name}' has shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
                f"that do not fit Linear({lin.in_features}, {lin.out_features}): an adapter of another model"
            )
        out.append((name, lin, a, b))
    return out


def merge_lora(
    model: ChunkModel, lora_sd: Mapping[str, torch.Tensor], alpha: float | None = None, scale: float = 1.0
) -> int:
    """Merge peft-format LoRA weights into the model's Linear layers in place; returns layers merged.

    ``W += scale * (alpha / r) * B @ A`` with r the rank read from A; alpha defaults to r (LongLive's
    default when its config gives none)."""
    pairs = lora_pairs(model, lora_sd)
    for _, lin, a, b in pairs:
        r = a.shape[0]
        with torch.no_grad():
            delta = (scale * (alpha if alpha is not None else r) / r) * (b.double() @ a.double())
            lin.weight.copy_((lin.weight.double() + delta).to(lin.weight.dtype))
    return len(pairs)


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The one reader of peft adapter folders: (``adapter_config.json``, ``adapter_model.safetensors``)."""
    folder = Path(folder)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{folder} is not a peft adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    cfg, sd = json.loads(cfg_path.read_text()), dict(_read_raw(weights))
    check_adapter_rank(folder, cfg, sd)
    return cfg, sd


def check_adapter_rank(folder: Path, cfg: Mapping, sd: Mapping[str, torch.Tensor]) -> None:
    """Every lora_A / lora_B pair must have the rank its config gives (``r``, or a ``rank_pattern`` entry
    matching the module, peft's rule): a disagreeing config would scale the delta by the wrong alpha / r."""
    if "r" not in cfg:
        raise CheckpointError(f"adapter {folder}: {ADAPTER_CONFIG} gives no rank 'r'")
    patterns = cfg.get("rank_pattern") or {}
    for k, v in sd.items():
        m = _LORA_KEY.match(normalize_key(k))
        if m is None or m["ab"] != "A":
            continue
        mod = m["mod"]
        r = next((int(pr) for pat, pr in patterns.items() if re.fullmatch(rf"(.*\.)?(?:{pat})", mod)), int(cfg["r"]))
        b = sd.get(k.replace(".lora_A", ".lora_B", 1))
        ranks = {v.shape[0]} | ({b.shape[1]} if b is not None and b.ndim == 2 else set())
        if ranks != {r}:
            raise CheckpointError(
                f"adapter {folder}: {ADAPTER_CONFIG} gives rank r={r} but its weights have rank "
                f"{'/'.join(map(str, sorted(ranks)))} ({mod}.lora_A {tuple(v.shape)}); fix 'r' or re-save the adapter"
            )


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], float | None]:
    """(LoRA weights, alpha or None) from a peft adapter folder, a LongLive ``{"generator_lora": ...}``
    file or a bare peft state dict."""
    if Path(path).is_dir():
        cfg, weights = read_adapter(path)
        return weights, float(cfg["lora_alpha"])
    raw = _read_raw(Path(path))
    if isinstance(raw, Mapping) and "generator_lora" in raw:
        raw = raw["generator_lora"]
    return dict(raw), None


def load_generator(
    config: ModelConfig | str,
    checkpoint: str | Path | None = None,
    which: str = "auto",
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
) -> ChunkModel:
    """A generator from a config (name or object), strictly loaded from `checkpoint` if given, with an
    optional LoRA merged in. Without a checkpoint the weights are randomly initialised (Wan init).
    ``dtype=None`` keeps the checkpoint's dtype."""
    cfg = ModelConfig.load(config) if isinstance(config, str) else config
    family = get_family(cfg.arch.family)
    with torch.device("meta" if checkpoint is not None else "cpu"):
        model = family.build(cfg.arch)
    if checkpoint is not None:
        sd = read_state_dict(checkpoint, which, family.key_adapter)
        if dtype is None:
            dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
        model = model.to_empty(device="cpu").to(dtype)
        load_state_dict_strict(model, sd, str(checkpoint), cfg.name)
    if lora is not None:
        weights, alpha = read_lora(lora)
        merge_lora(model, weights, alpha=lora_alpha if lora_alpha is not None else alpha)
    return model.to(device=device, dtype=dtype).eval()


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as .safetensors atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
