"""KV cache for chunk-autoregressive generation.

Self-attention keys/values are stored per layer as ``[B, S, heads, head_dim]`` with keys already
RoPE-rotated at their absolute frame position (never re-rotated when the cache rolls). Slots hold whole
latent frames (``tokens_per_frame`` tokens each):

- global cache (``window=None``): frame f lives in slot f; capacity ``max_frames``.
- rolling cache: ``sink`` frames are kept forever in slots ``[0, sink)``; the other frames go to a ring of
  ``window`` slots, so writing a new chunk evicts the oldest non-sink frames. A chunk ending at frame e
  attends to the sink frames plus frames ``[e - window, e)``.

Writing the chunk that starts at frame f overwrites that chunk's slots, so re-running a chunk (every
denoising step and the t=0 refresh) is idempotent. Cross-attention k/v are computed once per prompt and
kept until :meth:`reset_cross` (prompt switch).

:meth:`expand` shares a batch-1 prefix with G branches as stride-0 views; a layer's storage is copied
to G rows only when a branch first writes to it (copy on divergence). :meth:`clone` is a deep copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CachePlan:
    """Where one forward call writes its tokens and which token slots it attends to."""

    write: slice | torch.Tensor
    read: slice | torch.Tensor


def _as_index(slots: list[int], tokens_per_frame: int, device: torch.device) -> slice | torch.Tensor:
    """Token index for a list of frame slots: a slice when contiguous, else a LongTensor."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0] * tokens_per_frame, (slots[0] + len(slots)) * tokens_per_frame)
    base = torch.tensor(slots, dtype=torch.long, device=device) * tokens_per_frame
    return (base[:, None] + torch.arange(tokens_per_frame, device=device)).flatten()


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_heads: int,
        head_dim: int,
        tokens_per_frame: int,
        max_frames: int | None = None,
        sink: int = 0,
        window: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if window is None and max_frames is None:
            raise ValueError("a global KV cache needs max_frames (or give a rolling window)")
        self.num_layers = num_layers
        self.batch = batch
        self.tokens_per_frame = tokens_per_frame
        self.sink = sink
        self.window = window
        self.capacity = (sink + window) if window is not None else max_frames
        self.device = torch.device(device)
        shape = (batch, self.capacity * tokens_per_frame, num_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.cross_k: list[torch.Tensor | None] = [None] * num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * num_layers
        self.slot_frame = [-1] * self.capacity  # absolute frame index held by each slot
        self.end_frame = 0  # one past the newest frame written

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch: int,
        tokens_per_frame: int,
        max_frames: int | None = None,
        sink: int = 0,
        window: int | None = None,
    ) -> KVCache:
        p = next(model.parameters())
        arch = model.arch
        return cls(
            arch.num_layers,
            batch,
            arch.num_heads,
            arch.head_dim,
            tokens_per_frame,
            max_frames=max_frames,
            sink=sink,
            window=window,
            dtype=p.dtype,
            device=p.device,
        )

    # -- slots ---------------------------------------------------------------------------------------
    def slot_of(self, frame: int) -> int:
        if self.window is None or frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def frames_seen_by(self, end: int) -> list[int]:
        """Absolute frames a chunk ending at frame `end` (exclusive) attends to."""
        if self.window is None:
            return list(range(end))
        return list(range(min(self.sink, end))) + list(range(max(self.sink, end - self.window), end))

    def plan(self, start: int, num_frames: int) -> CachePlan:
        """Book-keep a write of frames ``[start, start+num_frames)`` and return where to write/read."""
        end = start + num_frames
        if start > self.end_frame:
            raise ValueError(f"KV cache: chunk starts at frame {start} but only {self.end_frame} are cached")
        if self.window is None and end > self.capacity:
            raise ValueError(
                f"KV cache full: frame {end - 1} does not fit a global cache of {self.capacity} frames; "
                "create it with a larger max_frames or use a rolling window"
            )
        if self.window is not None and num_frames > self.window:
            raise ValueError(f"KV cache: a chunk of {num_frames} frames exceeds the window {self.window}")
        write_slots = [self.slot_of(f) for f in range(start, end)]
        for f, s in zip(range(start, end), write_slots, strict=True):
            if self.slot_frame[s] > f:
                raise ValueError(f"KV cache: frame {f} was evicted (slot holds frame {self.slot_frame[s]})")
        for f, s in zip(range(start, end), write_slots, strict=True):
            self.slot_frame[s] = f
        self.end_frame = max(self.end_frame, end)
        read_frames = self.frames_seen_by(end)
        read_slots = sorted(self.slot_of(f) for f in read_frames)
        for f in read_frames:
            if self.slot_frame[self.slot_of(f)] != f:
                raise ValueError(f"KV cache: frame {f} is needed but no longer cached")
        tpf = self.tokens_per_frame
        # attention is invariant to the order of keys (RoPE is already applied), so sorted slots suffice
        return CachePlan(_as_index(write_slots, tpf, self.device), _as_index(read_slots, tpf, self.device))

    # -- per-layer access ----------------------------------------------------------------------------
    def write_and_read(
        self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's rotated k, v ``[B, n, H, D]`` and return the k, v it attends to."""
        if k.shape[0] != self.k[layer].shape[0]:
            raise ValueError(f"KV cache batch {self.k[layer].shape[0]} != input batch {k.shape[0]}")
        if self.k[layer].stride(0) == 0 and self.k[layer].shape[0] > 1:  # first write after expand()
            self.k[layer] = self.k[layer].contiguous()
            self.v[layer] = self.v[layer].contiguous()
        kc, vc = self.k[layer], self.v[layer]
        if isinstance(plan.write, slice):
            kc[:, plan.write] = k.to(kc.dtype)
            vc[:, plan.write] = v.to(vc.dtype)
        else:
            kc.index_copy_(1, plan.write, k.to(kc.dtype))
            vc.index_copy_(1, plan.write, v.to(vc.dtype))
        if isinstance(plan.read, slice):
            return kc[:, plan.read], vc[:, plan.read]
        return kc.index_select(1, plan.read), vc.index_select(1, plan.read)

    def load_prefix(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Fill frames ``[0, n)`` of an empty global cache from stored per-layer k, v ``[n*T, heads, dim]``
        (T tokens per frame), broadcast over the batch, as if those frames had been written."""
        if self.window is not None:
            raise ValueError("stored prefix KV needs a global cache (cache.window: null)")
        if len(k) != self.num_layers or len(v) != self.num_layers:
            raise ValueError(f"stored KV has {len(k)} layers, the model {self.num_layers}")
        s = k[0].shape[0]
        n, rest = divmod(s, self.tokens_per_frame)
        if rest or n > self.capacity or tuple(k[0].shape[1:]) != tuple(self.k[0].shape[2:]):
            raise ValueError(f"stored KV of shape {tuple(k[0].shape)} does not fit this model's cache")
        for layer in range(self.num_layers):
            self.k[layer][:, :s] = k[layer].to(self.k[layer])
            self.v[layer][:, :s] = v[layer].to(self.v[layer])
        self.slot_frame = [f if f < n else -1 for f in range(self.capacity)]
        self.end_frame = n

    def reset_cross(self) -> None:
        """Forget the cross-attention k/v (a new prompt will be encoded on the next forward)."""
        self.cross_k = [None] * self.num_layers
        self.cross_v = [None] * self.num_layers

    def clear(self) -> None:
        """Flush all self-attention frames (hard cut); storage and cross-attention k/v are kept."""
        self.slot_frame = [-1] * self.capacity
        self.end_frame = 0

    # -- batch sharing -------------------------------------------------------------------------------
    def expand(self, batch: int) -> KVCache:
        """A cache for `batch` branches that share this batch-1 prefix (no copies until a write)."""
        if self.batch != 1:
            raise ValueError(f"only a batch-1 cache can be expanded (this one has batch {self.batch})")
        out = copy.copy(self)
        out.batch = batch
        out.k = [t.expand(batch, *t.shape[1:]) for t in self.k]
        out.v = [t.expand(batch, *t.shape[1:]) for t in self.v]
        out.cross_k = list(self.cross_k)  # batch-1 text k/v are shared as they are (see attend())
        out.cross_v = list(self.cross_v)
        out.slot_frame = list(self.slot_frame)
        return out

    def clone(self) -> KVCache:
        """An independent copy (shared stride-0 views stay shared views of a copied batch-1 row)."""

        def dup(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if t.stride(0) == 0 and t.shape[0] > 1:
                return t[:1].clone().expand(t.shape)
            return t.clone()

        out = copy.copy(self)
        out.k = [dup(t) for t in self.k]
        out.v = [dup(t) for t in self.v]
        out.cross_k = [dup(t) for t in self.cross_k]
        out.cross_v = [dup(t) for t in self.cross_v]
        out.slot_frame = list(self.slot_frame)
        return out

    def nbytes(self) -> int:
        """Bytes held by self-attention and cross-attention storage (shared views counted once)."""
        seen: set[int] = set()
        total = 0
        for t in [*self.k, *self.v, *self.cross_k, *self.cross_v]:
            if t is None or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return total
