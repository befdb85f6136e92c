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
from safetensors import safe_open

from ..io.files import atomic_path
from ..schemas.config import ModelConfig
from . import wan  # noqa: F401  (registers the wan family)
from .protocol import ChunkModel, get_family, normalize_key


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model config."""


class LazyTensors(Mapping):
    """name -> tensor of one or more .safetensors files, each tensor read from its file when it is accessed
    (a loader converting tensor by tensor never holds the whole file in memory)."""

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[object, str]] = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            self._where.update({k: (handle, k) for k in handle.keys()})  # noqa: SIM118 (not a dict)

    def renamed(self, fn: Callable[[str], str]) -> LazyTensors:
        out = LazyTensors([])
        out._where = {fn(k): v for k, v in self._where.items()}
        return out

    def __getitem__(self, key: str) -> torch.Tensor:
        handle, name = self._where[key]
        return handle.get_tensor(name)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a tensor, read from the file header only."""
        handle, name = self._where[key]
        sl = handle.get_slice(name)
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def spec_of(sd: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``sd[key]`` without reading a lazily stored tensor."""
    if isinstance(sd, LazyTensors):
        return sd.spec(key)
    return tuple(sd[key].shape), sd[key].dtype


def _read_raw(path: Path, mmap: bool = True) -> Mapping:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give the path of a local .pt/.safetensors file")
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"checkpoint directory {path} holds no .safetensors files")
        try:
            return LazyTensors(shards)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if path.suffix != ".safetensors" and _is_legacy_torch_file(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is in torch's legacy (pre-1.6, non-zip) format, which cannot be "
            "memory-mapped; re-save its tensors as .safetensors or with a current torch.save (zip format)"
        )
    if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch (zip) checkpoint or .safetensors file")
    try:
        if path.suffix == ".safetensors":
            return LazyTensors([path])
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
) -> Mapping[str, torch.Tensor]:
    """The generator's bare state dict from a checkpoint file (keys mapped by the family's `key_adapter`):
    safetensors tensors are read on access (:class:`LazyTensors`), torch files are memory-mapped.

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
    if isinstance(raw, LazyTensors):  # safetensors: tensors only, read on access
        return raw.renamed(key_adapter)
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


def check_state_dict(model: ChunkModel, sd: Mapping[str, torch.Tensor], source: str, config_name: str) -> None:
    """Any missing/unexpected key, shape mismatch or non-floating tensor for a floating parameter of `model`
    (which may live on the meta device) is a CheckpointError; tensors are not read."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    specs = {k: spec_of(sd, k) for k in own if k in sd}
    bad_shape = [f"{k} {shape} vs {tuple(own[k].shape)}" for k, (shape, _) in specs.items() if shape != own[k].shape]
    # a non-floating tensor (int32, bool, ...) would be cast silently into a floating parameter
    bad_dtype = [
        f"{k} is {_dtype_name(dtype)}, the model expects floating {_dtype_name(own[k].dtype)}"
        for k, (_, dtype) in specs.items()
        if own[k].is_floating_point() and not dtype.is_floating_point
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


def load_state_dict_strict(
    model: ChunkModel, sd: Mapping[str, torch.Tensor], source: str, config_name: str
) -> None:
    """Copy `sd` into `model` (its dtype and device kept) after :func:`check_state_dict`."""
    check_state_dict(model, sd, source, config_name)
    model.load_state_dict({k: sd[k] for k in model.state_dict()}, strict=True)


def assign_state_dict(
    model: ChunkModel,
    sd: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    device: torch.device | str,
    deltas: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Give a meta-device `model` the tensors of a checked `sd`, converted ONE tensor at a time to `dtype`
    (None: each tensor's own) on `device`, so no full-size copy in another dtype ever exists;
    ``deltas[name](w)`` replaces tensor `name` by a function of its stored value (a LoRA merged in float64
    before the cast, as when merging into float32 weights and then casting)."""
    deltas = deltas or {}
    out = {}
    for k in model.state_dict():
        w = sd[k]
        if k in deltas:
            w = deltas[k](w)
        t = w.to(dtype=dtype if w.is_floating_point() and dtype is not None else w.dtype)
        t = t.to(device)
        if t.data_ptr() == w.data_ptr() and not t.is_meta:  # no conversion happened: own the memory (a
            t = t.clone()  # memory-mapped file page must not become a parameter)
        out[k] = t
        del w, t
    model.load_state_dict(out, strict=True, assign=True)


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


def lora_delta(a: torch.Tensor, b: torch.Tensor, alpha: float | None, scale: float = 1.0) -> torch.Tensor:
    """``scale * (alpha / r) * B @ A`` in float64, r the rank read from A (alpha None: r)."""
    r = a.shape[0]
    return (scale * (alpha if alpha is not None else r) / r) * (b.double() @ a.double())


def merge_lora(
    model: ChunkModel, lora_sd: Mapping[str, torch.Tensor], alpha: float | None = None, scale: float = 1.0
) -> int:
    """Merge peft-format LoRA weights into the model's Linear layers in place; returns layers merged.

    ``W += scale * (alpha / r) * B @ A`` with r the rank read from A; alpha defaults to r (LongLive's
    default when its config gives none)."""
    pairs = lora_pairs(model, lora_sd)
    for _, lin, a, b in pairs:
        with torch.no_grad():
            lin.weight.copy_((lin.weight.double() + lora_delta(a, b, alpha, scale)).to(lin.weight.dtype))
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
    for key, value in sd.items():  # a NaN weight makes every video NaN: name the tensor, not a reward
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"adapter {weights}: tensor {key} holds NaN or infinite values (a diverged "
                                  "run?): use an earlier checkpoint's adapter or re-train")  # fmt: skip
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

    With a checkpoint the model is built on the meta device and each stored tensor goes straight to
    `dtype` on `device` (``dtype=None`` keeps the checkpoint's): no float32 copy of a bf16 model is ever
    made, and a LoRA is merged into each stored weight in float64 before its cast."""
    cfg = ModelConfig.load(config) if isinstance(config, str) else config
    family = get_family(cfg.arch.family)
    if checkpoint is None:
        with torch.device("cpu"):  # the random init is defined in float32 on the CPU (same numbers anywhere)
            model = family.build(cfg.arch)
        if lora is not None:
            weights, alpha = read_lora(lora)
            merge_lora(model, weights, alpha=lora_alpha if lora_alpha is not None else alpha)
        return model.to(device=device, dtype=dtype or torch.float32).eval()
    with torch.device("meta"):
        model = family.build(cfg.arch)
    sd = read_state_dict(checkpoint, which, family.key_adapter)
    check_state_dict(model, sd, str(checkpoint), cfg.name)
    if dtype is None:
        dtype = next((spec_of(sd, k)[1] for k in sd if spec_of(sd, k)[1].is_floating_point), torch.float32)
    deltas = {}
    if lora is not None:
        weights, alpha = read_lora(lora)
        alpha = lora_alpha if lora_alpha is not None else alpha
        for name, _, a, b in lora_pairs(model, weights):
            deltas[f"{name}.weight"] = lambda w, a=a, b=b: (w.double() + lora_delta(a, b, alpha)).to(dtype)
    assign_state_dict(model, sd, dtype, device, deltas)
    return model.eval()


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as .safetensors atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
