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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..io import hub
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

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (its first dimension), only their bytes read from the file."""
        handle, name = self._where[key]
        return handle.get_slice(name)[start:stop]

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
    return _read_raw(Path(hub.local(path)), mmap=False)


def _first_line(e: Exception) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def read_state_dict(
    path: str | Path, which: str = "auto", key_adapter: Callable[[str], str] = normalize_key, prefer: str = "auto"
) -> Mapping[str, torch.Tensor]:
    """The generator's bare state dict from a checkpoint file (keys mapped by the family's `key_adapter`):
    safetensors tensors are read on access (:class:`LazyTensors`), torch files are memory-mapped.

    which: ``generator`` / ``generator_ema`` (Self-Forcing style files) or ``auto``: `prefer` (a preset's
    entry) if the file has it, else ``generator_ema``, else ``generator``, else ``model``/``state_dict``,
    else the file itself.
    """
    return read_generator_entry(path, which, key_adapter, prefer)[1]


def read_generator_entry(
    path: str | Path, which: str = "auto", key_adapter: Callable[[str], str] = normalize_key, prefer: str = "auto"
) -> tuple[str | None, Mapping[str, torch.Tensor]]:
    """(the entry read, None for a bare state dict; the state dict) as :func:`read_state_dict` reads them."""
    raw = _read_raw(Path(hub.local(path)))
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    entry = None
    if which != "auto":
        if which not in raw:
            raise CheckpointError(f"checkpoint {path} has no '{which}' entry (top-level keys: {list(raw)[:8]})")
        entry, raw = which, raw[which]
    else:
        order = ([prefer] if prefer != "auto" else []) + ["generator_ema", "generator", "model", "state_dict"]
        for name in order:
            if name in raw and isinstance(raw[name], Mapping):
                entry, raw = name, raw[name]
                break
    if isinstance(raw, LazyTensors):  # safetensors: tensors only, read on access
        return entry, raw.renamed(key_adapter)
    sd = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: entry '{k}' is not a tensor")
        sd[key_adapter(k)] = v
    return entry, sd


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


def assign_shards(
    model: ChunkModel,
    sd: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str,
    deltas: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> None:
    """Fill a meta-device `model` whose parameters FSDP2 has sharded (DTensors, ``Shard(0)``: rank r holds
    the r-th of ``torch.chunk(w, world)``) from a checked `sd`: each rank reads only its rows of every
    sharded tensor (a safetensors slice or rows of a memory-mapped tensor; a tensor with a LoRA delta is
    merged whole on the host first) and converts them to `dtype` on `device`; unsharded tensors whole."""
    from torch.distributed.tensor import DTensor, Shard

    deltas = deltas or {}
    model.to_empty(device=device)
    with torch.no_grad():
        for k, t in model.state_dict(keep_vars=True).items():
            local = t.to_local() if isinstance(t, DTensor) else t
            if isinstance(t, DTensor):
                if tuple(t.placements) != (Shard(0),):
                    raise ValueError(f"{k}: sharded as {t.placements}, expected Shard(0) on a 1-D mesh")
                n, size = t.shape[0], t.device_mesh.size()
                start = min(n, t.device_mesh.get_local_rank() * -(-n // size))  # torch.chunk's split
                stop = start + local.shape[0]
                if k in deltas:
                    w = deltas[k](sd[k])[start:stop]
                elif isinstance(sd, LazyTensors):
                    w = sd.rows(k, start, stop)
                else:
                    w = sd[k][start:stop]
            else:
                w = deltas[k](sd[k]) if k in deltas else sd[k]
            local.copy_(w.to(dtype=dtype if w.is_floating_point() else w.dtype))
            del w


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
    path = hub.local(path)
    if Path(path).is_dir():
        cfg, weights = read_adapter(path)
        return weights, float(cfg["lora_alpha"])
    raw = _read_raw(Path(hub.local(path)))
    if isinstance(raw, Mapping) and "generator_lora" in raw:
        raw = raw["generator_lora"]
    return dict(raw), None


NO_LORA = "none"  # --base-lora none: weights the shipped LoRA is already merged into (model convert --lora)


def shipped_lora(cfg: ModelConfig, base_lora: str | Path | None) -> str | Path | None:
    """The shipped LoRA to merge into the base weights: `base_lora` (``none``: no LoRA); a config that ships
    one (LongLive) refuses to load without it, in one line naming the file it needs."""
    if base_lora is not None:
        return None if str(base_lora) == NO_LORA else base_lora
    if cfg.lora is None:
        return None
    where = f" ({cfg.lora.file} of the Hugging Face repo {cfg.lora.repo})" if cfg.lora.repo and cfg.lora.file else ""
    raise ValueError(f"config {cfg.name!r} is its base weights with the LoRA it ships: give --base-lora FILE{where}, "
                     f"or --base-lora {NO_LORA} for weights it is merged into (model convert --base-lora)")  # fmt: skip


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_generator` loaded: the checkpoint entry (None: a bare state dict or no file) and,
    per merged LoRA (the shipped one first, then an adapter), its file, alpha and the layers it changed."""

    entry: str | None = None
    loras: tuple[tuple[str, float | None, int], ...] = ()  # (path, alpha (None: the rank), layers merged)


def shipped_lora_weights(
    cfg: ModelConfig, model: torch.nn.Module, path: str | Path, alpha: float | None
) -> tuple[list[tuple[str, torch.nn.Linear, torch.Tensor, torch.Tensor]], float]:
    """The model's shipped LoRA (e.g. LongLive's ``lora.pt``) matched to `model`'s layers, and its alpha (given,
    else the preset's, else the file's, else the rank). Its rank and targets are checked against the
    preset's geometry: one line naming the file and both geometries."""
    weights, file_alpha = read_lora(path)
    pairs = lora_pairs(model, weights)
    spec = cfg.lora
    if spec is not None:
        ranks = sorted({a.shape[0] for _, _, a, _ in pairs})
        if ranks != [spec.rank]:
            have = "/".join(map(str, ranks)) or "none"
            raise CheckpointError(f"LoRA {path} has rank {have}, but config {cfg.name!r} ships a rank-{spec.rank} "
                                  "LoRA: give the model's own LoRA file")  # fmt: skip
        if spec.targets:
            suffixes = {next((t for t in spec.targets if n == t or n.endswith("." + t)), None) for n, *_ in pairs}
            missing = sorted(set(spec.targets) - suffixes)
            if None in suffixes or missing:
                raise CheckpointError(f"LoRA {path} adapts other layers than config {cfg.name!r}'s LoRA "
                                      f"({', '.join(spec.targets)}): " + (f"lacks {', '.join(missing)}" if missing
                                      else "it adapts layers outside them"))  # fmt: skip
    for a in (alpha, spec.alpha if spec is not None else None, file_alpha):
        if a is not None:
            return pairs, float(a)
    return pairs, float(pairs[0][2].shape[0]) if pairs else 1.0


def load_generator(
    config: ModelConfig | str,
    checkpoint: str | Path | None = None,
    which: str = "auto",
    lora: str | Path | None = None,
    lora_alpha: float | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
    base_lora: str | Path | None = None,
    base_lora_alpha: float | None = None,
    shard: Callable[[ChunkModel], None] | None = None,
) -> ChunkModel:
    """A generator from a config (name or object), strictly loaded from `checkpoint` if given, with the
    model's shipped LoRA (`base_lora`, e.g. LongLive's) and then an adapter (`lora`) merged in. Without a
    checkpoint the weights are randomly initialised (Wan init). ``which="auto"`` reads the entry the
    config's ``weights.entry`` names when the file has it. The model's ``load_report`` says what was read.

    With a checkpoint the model is built on the meta device and each stored tensor goes straight to
    `dtype` on `device` (``dtype=None`` keeps the checkpoint's): no float32 copy of a bf16 model is ever
    made, and the LoRAs are merged into each stored weight in float64 before its cast. `shard` (FSDP2's
    ``fully_shard`` over the process group, ``--shard-base``) is applied to the model before any weight is
    read: with a checkpoint each rank then reads only its shard of every tensor (:func:`assign_shards`)."""
    cfg = ModelConfig.load(config) if isinstance(config, str) else config
    family = get_family(cfg.arch.family)
    if checkpoint is None:
        with torch.device("cpu"):  # the random init is defined in float32 on the CPU (same numbers anywhere)
            model = family.build(cfg.arch)
        merged = []
        for path, pairs, alpha in _loras(cfg, model, base_lora, base_lora_alpha, lora, lora_alpha):
            for _, lin, a, b in pairs:
                with torch.no_grad():
                    lin.weight.copy_((lin.weight.double() + lora_delta(a, b, alpha)).to(lin.weight.dtype))
            merged.append((str(path), alpha, len(pairs)))
        model = model.to(device=device, dtype=dtype or torch.float32).eval()
        model.load_report = LoadReport(None, tuple(merged))
        if shard is not None:
            shard(model)
        return model
    with torch.device("meta"):
        model = family.build(cfg.arch)
    entry, sd = read_generator_entry(checkpoint, which, family.key_adapter, cfg.weights.entry)
    check_state_dict(model, sd, str(checkpoint), cfg.name)
    if dtype is None:
        dtype = next((spec_of(sd, k)[1] for k in sd if spec_of(sd, k)[1].is_floating_point), torch.float32)
    deltas: dict[str, list] = {}
    merged = []
    for path, pairs, alpha in _loras(cfg, model, base_lora, base_lora_alpha, lora, lora_alpha):
        for name, _, a, b in pairs:
            deltas.setdefault(f"{name}.weight", []).append((a, b, alpha))
        merged.append((str(path), alpha, len(pairs)))

    def merge(parts):  # every LoRA's delta added to the stored weight in float64, then one cast
        return lambda w: (w.double() + sum(lora_delta(a, b, alpha) for a, b, alpha in parts)).to(dtype)

    merges = {k: merge(v) for k, v in deltas.items()}
    if shard is None:
        assign_state_dict(model, sd, dtype, device, merges)
    else:
        shard(model.to(dtype))  # the parameters' dtype is the one their shards are held and gathered in
        assign_shards(model, sd, dtype, device, merges)
    model.load_report = LoadReport(entry, tuple(merged))
    return model.eval()


def _loras(cfg: ModelConfig, model: torch.nn.Module, base_lora, base_alpha, lora, alpha) -> list:
    """(path, matched pairs, alpha) of the shipped LoRA and the adapter that are given, in merge order."""
    out = []
    if base_lora is not None:
        out.append((base_lora, *shipped_lora_weights(cfg, model, base_lora, base_alpha)))
    if lora is not None:
        weights, file_alpha = read_lora(lora)
        out.append((lora, lora_pairs(model, weights), alpha if alpha is not None else file_alpha))
    return out


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict as .safetensors atomically (temp file, fsync, rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp))
