"""KV cache for chunk-autoregressive generation.

Self-attention keys/values are stored per layer as ``[B, S, heads, head_dim]`` with keys already
RoPE-rotated at their absolute frame position (never re-rotated when the cache rolls), in the model's
compute dtype (its parameter dtype: a bf16 model keeps a bf16 cache). Slots hold whole latent frames
(``tokens_per_frame`` tokens each):

- global cache (``window=None``): frame f lives in slot f; capacity ``max_frames``.
- rolling cache: ``sink`` frames are kept forever in slots ``[0, sink)``; the other frames go to a ring of
  ``window`` slots, so writing a new chunk evicts the oldest non-sink frames. A chunk ending at frame e
  attends to the sink frames plus frames ``[e - window, e)``. ``history`` extra ring slots keep older
  frames resident without attending to them; ``routes`` {first frame of a chunk: frames} replaces what
  that chunk attends to (KV routing, :mod:`streamalign.models.kv_routing`).
- ``recompute_context``: a clean write (the t=0 pass that writes a chunk's K/V as context) attends to
  that chunk alone, as Krea Realtime recomputes its context K/V from the context frames alone before
  each block; denoising writes attend as above.

Writing the chunk that starts at frame f overwrites that chunk's slots, so re-running a chunk (every
denoising step and the t=0 refresh) is idempotent. Cross-attention k/v are computed once per prompt and
kept until :meth:`reset_cross` (prompt switch).

Fork groups: :meth:`expand` gives G branches a batch-1 prefix WITHOUT copying it. The expansion reads
the prefix frames from the parent's storage (``prefix_k`` / ``prefix_v``, batch 1) and keeps only the
frames the branches write themselves in its own storage (``k`` / ``v``, batch G, covering slots
``own_base ..`` only: a global expansion holds just the frames after the prefix). Attention then runs
over the two parts separately and merges them exactly by their log-sum-exp
(:func:`~streamalign.models.attention.attend_parts`). A non-storing expansion (``store=False``, the
training replay) keeps nothing at all: each forward attends to the prefix and to the chunk it is given,
taken straight from the forward's own k/v, and text k/v are recomputed every forward, so no state
survives a forward (activation checkpointing can recompute any block). :meth:`clone` is a deep copy.

Storage reuse: a cache given :class:`KVBuffers` takes its per-layer k/v as views of those buffers instead
of allocating zeroed tensors (the sampler keeps one per role across rollouts on the CPU, where a fresh
cache per rollout costs page faults). Their contents are stale, which no read sees: a cache reads only
slots it has written.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass

import torch

# set while a cache allocates its K/V storage: device state, which a simulation (models.memory.HostLogic)
# keeps simulated however small it is (a short prefix at reduced width holds a few thousand elements)
ALLOCATING: contextvars.ContextVar[bool] = contextvars.ContextVar("streamalign_kv_allocating", default=False)


@contextlib.contextmanager
def allocating():
    token = ALLOCATING.set(True)
    try:
        yield
    finally:
        ALLOCATING.reset(token)


@dataclass(frozen=True)
class CachePlan:
    """Where one forward call writes its tokens and which token slots it attends to.

    `write` / `read` index the cache's own storage ``k[layer]`` along its token dim (a non-storing
    expansion: `read` indexes the written chunk's tokens instead); for an expansion `prefix_read` indexes
    the shared batch-1 prefix storage (None: no prefix frame is attended to)."""

    write: slice | torch.Tensor
    read: slice | torch.Tensor
    prefix_read: slice | torch.Tensor | None = None


def _as_index(slots: list[int], tokens_per_frame: int, device: torch.device) -> slice | torch.Tensor:
    """Token index for a list of frame slots: a slice when contiguous, else a LongTensor."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0] * tokens_per_frame, (slots[0] + len(slots)) * tokens_per_frame)
    base = torch.tensor(slots, dtype=torch.long, device=device) * tokens_per_frame
    return (base[:, None] + torch.arange(tokens_per_frame, device=device)).flatten()


def _take(t: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    return t[:, index] if isinstance(index, slice) else t.index_select(1, index)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: its patch embedding's (CausalWanModel casts inputs to it), else
    its first floating-point parameter's (a float32 LoRA factor on a bf16 model does not change it)."""
    embed = getattr(model, "patch_embedding", None)
    if embed is not None:
        return embed.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def kv_bytes(
    num_layers: int, frames: int, tokens_per_frame: int, num_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of self-attention k and v for `frames` frames of ONE batch row over all layers."""
    return 2 * num_layers * frames * tokens_per_frame * num_heads * head_dim * dtype.itemsize


class KVBuffers:
    """Reusable storage for the k/v of the caches of one role (one live cache at a time): per (layer, k|v)
    one buffer ``[B, S, heads, head_dim]``, grown to the largest batch B and tokens S asked for (never
    shrunk; a new dtype, device or head shape replaces it) and handed out as views ``buf[:b, :s]``."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[int, str], torch.Tensor] = {}

    def take(
        self, layer: int, kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A view of shape `shape` of the (layer, kind) buffer; its contents are whatever was there."""
        buf = self._bufs.get((layer, kind))
        fits = (
            buf is not None and buf.dtype == dtype and buf.device == device and tuple(buf.shape[2:]) == tuple(shape[2:])
        )
        if not fits or buf.shape[0] < shape[0] or buf.shape[1] < shape[1]:
            size = shape if not fits else (max(buf.shape[0], shape[0]), max(buf.shape[1], shape[1]), *shape[2:])
            # the old buffer's memory is free before the new one is taken (the dict holds it too)
            del buf
            self._bufs.pop((layer, kind), None)
            with allocating():
                buf = self._bufs[(layer, kind)] = torch.empty(size, dtype=dtype, device=device)
        return buf[: shape[0], : shape[1]]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._bufs.values())


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
        history: int = 0,
        buffers: KVBuffers | None = None,
        recompute_context: bool = False,
    ) -> None:
        """`buffers`: take the k/v storage from these (stale contents) instead of allocating zeros."""
        if window is None and max_frames is None:
            raise ValueError("a global KV cache needs max_frames (or give a rolling window)")
        self.num_layers = num_layers
        self.batch = batch
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.tokens_per_frame = tokens_per_frame
        self.sink = sink
        self.window = window
        self.ring = window + history if window is not None else None  # ring slots after the sink
        self.capacity = (sink + self.ring) if window is not None else max_frames
        self.routes: dict[int, list[int]] = {}  # KV routing: chunk start frame -> the frames it attends to
        self.recompute_context = recompute_context  # a clean write attends to its own chunk only
        self.dtype = dtype
        self.device = torch.device(device)
        self.buffers = buffers
        shape = (batch, self.capacity * tokens_per_frame, num_heads, head_dim)
        self.k = [self._storage(layer, "k", shape) for layer in range(num_layers)]
        self.v = [self._storage(layer, "v", shape) for layer in range(num_layers)]
        self.cross_k: list[torch.Tensor | None] = [None] * num_layers
        self.cross_v: list[torch.Tensor | None] = [None] * num_layers
        self.slot_frame = [-1] * self.capacity  # absolute frame index held by each slot
        self.end_frame = 0  # one past the newest frame written
        # expansions only (see expand()): the shared batch-1 prefix storage, which slots still hold a prefix
        # frame, the first slot of the own storage, and whether each layer's own storage exists yet
        self.prefix_k: list[torch.Tensor] | None = None
        self.prefix_v: list[torch.Tensor] | None = None
        self.in_prefix = [False] * self.capacity
        self.own_base = 0
        self.own_ready = [True] * num_layers
        self.store = True  # False: a non-storing expansion (see expand())

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch: int,
        tokens_per_frame: int,
        max_frames: int | None = None,
        sink: int = 0,
        window: int | None = None,
        dtype: torch.dtype | None = None,
        history: int = 0,
        buffers: KVBuffers | None = None,
        recompute_context: bool = False,
    ) -> KVCache:
        """A cache shaped for `model`, in `dtype` (default: the model's compute dtype, see
        :func:`compute_dtype`) on the model's device (storage from `buffers` when given)."""
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
            dtype=dtype or compute_dtype(model),
            device=next(model.parameters()).device,
            history=history,
            buffers=buffers,
            recompute_context=recompute_context,
        )

    @property
    def is_expansion(self) -> bool:
        return self.prefix_k is not None

    # -- slots ---------------------------------------------------------------------------------------
    def slot_of(self, frame: int) -> int:
        if self.window is None or frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.ring

    def frames_seen_by(self, end: int) -> list[int]:
        """Absolute frames a chunk ending at frame `end` (exclusive) attends to."""
        if self.window is None:
            return list(range(end))
        return list(range(min(self.sink, end))) + list(range(max(self.sink, end - self.window), end))

    def plan(self, start: int, num_frames: int, clean: bool = False) -> CachePlan:
        """Book-keep a write of frames ``[start, start+num_frames)`` and return where to write/read.
        `clean`: the write is a chunk's clean-context pass (``recompute_context``: it reads only itself)."""
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
            if s < self.own_base:  # cannot happen for frames after the prefix (see expand())
                raise ValueError(f"KV cache: frame {f} belongs to the shared prefix of this expansion")
        for f, s in zip(range(start, end), write_slots, strict=True):
            self.slot_frame[s] = f
            self.in_prefix[s] = False
        self.end_frame = max(self.end_frame, end)
        if clean and self.recompute_context:
            read_frames = list(range(start, end))
        else:
            read_frames = self.routes.get(start) or self.frames_seen_by(end)
        read_slots = sorted(self.slot_of(f) for f in read_frames)
        for f in read_frames:
            if self.slot_frame[self.slot_of(f)] != f:
                raise ValueError(f"KV cache: frame {f} is needed but no longer cached")
        tpf, dev, base = self.tokens_per_frame, self.device, self.own_base
        # attention is invariant to the order of keys (RoPE is already applied), so sorted slots suffice
        own = [s for s in read_slots if not self.in_prefix[s]]  # never empty: the chunk reads itself
        shared = [s for s in read_slots if self.in_prefix[s]]
        if self.store:
            own = [s - base for s in own]
        else:  # the own keys are the written chunk's, in the order the slots would be read
            written = {s: i for i, s in enumerate(write_slots)}
            if any(s not in written for s in own):
                raise ValueError("KV cache: a non-storing expansion attends only to its prefix and the chunk written")
            own = [written[s] for s in own]
        return CachePlan(
            _as_index([s - base for s in write_slots], tpf, dev),
            _as_index(own, tpf, dev),
            _as_index(shared, tpf, dev) if shared else None,
        )

    # -- per-layer access ----------------------------------------------------------------------------
    def _storage(self, layer: int, kind: str, shape: tuple[int, ...]) -> torch.Tensor:
        if self.buffers is None:
            with allocating():
                return torch.zeros(shape, dtype=self.dtype, device=self.device)
        return self.buffers.take(layer, kind, shape, self.dtype, self.device)

    def _own(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This cache's writable storage of `layer`; an expansion allocates it at its first write, only for
        slots ``own_base .. capacity`` (the prefix frames stay in the parent's batch-1 storage)."""
        if not self.own_ready[layer]:
            shape = (self.batch, (self.capacity - self.own_base) * self.tokens_per_frame, self.num_heads, self.head_dim)
            self.k[layer] = self._storage(layer, "k", shape)
            self.v[layer] = self._storage(layer, "v", shape)
            self.own_ready[layer] = True
        return self.k[layer], self.v[layer]

    def write(self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's rotated k, v ``[B, n, H, D]`` at the plan's slots; returns the layer's storage."""
        if not self.store:
            raise ValueError("a non-storing expansion keeps no k/v")
        kc, vc = self._own(layer)
        if isinstance(plan.write, slice):
            kc[:, plan.write] = k.to(kc.dtype)
            vc[:, plan.write] = v.to(vc.dtype)
        else:
            kc.index_copy_(1, plan.write, k.to(kc.dtype))
            vc.index_copy_(1, plan.write, v.to(vc.dtype))
        return kc, vc

    def write_and_read_parts(
        self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Store this chunk's rotated k, v ``[B, n, H, D]``; return the k, v it attends to as parts:
        ``[(k, v) [B, S, H, D]]``, or for an expansion that still attends to prefix frames
        ``[(prefix k, v) [1, S_p, H, D], (own k, v) [B, S_o, H, D]]`` (to merge with
        :func:`~streamalign.models.attention.attend_parts`; the prefix is never broadcast to B rows)."""
        if k.shape[0] != self.batch:
            raise ValueError(f"KV cache batch {self.batch} != input batch {k.shape[0]}")
        if not self.store:
            own = (_take(k.to(self.dtype), plan.read), _take(v.to(self.dtype), plan.read))
            if plan.prefix_read is None:
                return [own]
            return [(_take(self.prefix_k[layer], plan.prefix_read), _take(self.prefix_v[layer], plan.prefix_read)), own]
        kc, vc = self.write(layer, plan, k, v)
        own = (_take(kc, plan.read), _take(vc, plan.read))
        if plan.prefix_read is None:
            return [own]
        shared = (_take(self.prefix_k[layer], plan.prefix_read), _take(self.prefix_v[layer], plan.prefix_read))
        return [shared, own]

    def write_and_read(
        self, layer: int, plan: CachePlan, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's rotated k, v ``[B, n, H, D]`` and return the k, v it attends to
        ``[B, S, H, D]`` as one tensor each (an expansion's prefix is broadcast and concatenated here: a
        copy; the model uses :meth:`write_and_read_parts`)."""
        parts = self.write_and_read_parts(layer, plan, k, v)
        if len(parts) == 1:
            return parts[0]
        b = self.batch
        return tuple(torch.cat([p[i].expand(b, *p[i].shape[1:]) for p in parts], dim=1) for i in (0, 1))

    def load_prefix(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Fill frames ``[0, n)`` of an empty global cache from stored per-layer k, v ``[n*T, heads, dim]``
        (T tokens per frame), broadcast over the batch, as if those frames had been written."""
        if self.window is not None:
            raise ValueError("stored prefix KV needs a global cache (cache.window: null)")
        if self.is_expansion:
            raise ValueError("load the stored prefix into the batch-1 cache, then expand it")
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
        """Flush all self-attention frames (hard cut); storage and cross-attention k/v are kept. An
        expansion lets go of its prefix (its own storage then covers every slot, allocated anew)."""
        self.slot_frame = [-1] * self.capacity
        self.in_prefix = [False] * self.capacity
        self.end_frame = 0
        if self.is_expansion:
            self.prefix_k = self.prefix_v = None
            if self.own_base:
                self.own_base = 0
                self.own_ready = [False] * self.num_layers

    # -- batch sharing -------------------------------------------------------------------------------
    def expand(
        self, batch: int, max_frames: int | None = None, store: bool = True, buffers: KVBuffers | None = None
    ) -> KVCache:
        """A cache for `batch` branches that share this batch-1 prefix without copies of it.

        The prefix frames (everything written so far) are read from this cache's storage; the branches'
        own frames go to new storage allocated at their first write, for slots ``own_base ..`` only.
        `max_frames`: capacity of a global expansion (default this cache's): the prefix cache need only
        hold the prefix. This cache must not be written while the expansion is in use.

        ``store=False``: nothing is stored (no own storage, no text k/v, not even the prefix's): each forward
        attends to the prefix and to the one chunk it writes, read from its own k/v, and recomputes the
        text k/v (inside the autograd graph). For training replays of one chunk.

        `buffers`: the branches' own storage comes from these (not this cache's: the prefix lives there)."""
        if self.batch != 1:
            raise ValueError(f"only a batch-1 cache can be expanded (this one has batch {self.batch})")
        if self.is_expansion:
            raise ValueError("expand the batch-1 cache the prefix lives in, not an expansion of it")
        out = copy.copy(self)
        out.batch = batch
        if self.window is None:
            out.capacity = self.capacity if max_frames is None else max_frames
            if out.capacity < self.end_frame:
                raise ValueError(f"an expansion of {out.capacity} frames cannot hold the {self.end_frame}-frame prefix")
            out.own_base = self.end_frame  # global: frame f in slot f, branches write only f >= end_frame
        else:
            # rolling: a frame f >= end_frame goes to slot f (f < sink) or to the ring (slot >= sink)
            out.own_base = min(self.end_frame, self.sink)
        out.prefix_k, out.prefix_v = list(self.k), list(self.v)
        # until a layer is first written its k/v are stride-0 views of the prefix (nothing allocated)
        out.k = [t.expand(batch, *t.shape[1:]) for t in self.k]
        out.v = [t.expand(batch, *t.shape[1:]) for t in self.v]
        out.own_ready = [False] * self.num_layers
        out.store = store
        out.buffers = buffers
        # batch-1 text k/v are shared as they are (see attend()); a non-storing expansion recomputes them
        out.cross_k = list(self.cross_k) if store else [None] * self.num_layers
        out.cross_v = list(self.cross_v) if store else [None] * self.num_layers
        out.slot_frame = list(self.slot_frame) + [-1] * (out.capacity - self.capacity)
        out.in_prefix = [f >= 0 for f in out.slot_frame]
        return out

    def clone(self) -> KVCache:
        """An independent copy (an expansion's prefix is copied once, still batch 1 and shared by rows)."""

        def dup(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if t.stride(0) == 0 and t.shape[0] > 1:
                return t[:1].clone().expand(t.shape)
            return t.clone()

        out = copy.copy(self)
        out.buffers = None  # the copy's storage is its own
        if self.is_expansion:
            out.prefix_k = [t.clone() for t in self.prefix_k]
            out.prefix_v = [t.clone() for t in self.prefix_v]
        out.k, out.v = [], []
        for layer in range(self.num_layers):
            if self.own_ready[layer]:
                out.k.append(self.k[layer].clone())
                out.v.append(self.v[layer].clone())
            else:  # still the stride-0 prefix view: view the copied prefix the same way
                out.k.append(out.prefix_k[layer].expand(self.k[layer].shape))
                out.v.append(out.prefix_v[layer].expand(self.v[layer].shape))
        out.cross_k = [dup(t) for t in self.cross_k]
        out.cross_v = [dup(t) for t in self.cross_v]
        out.slot_frame = list(self.slot_frame)
        out.in_prefix = list(self.in_prefix)
        out.own_ready = list(self.own_ready)
        return out

    def nbytes(self) -> int:
        """Bytes held by self-attention and cross-attention storage (shared views counted once)."""
        seen: set[int] = set()
        total = 0
        for t in [*self.k, *self.v, *(self.prefix_k or []), *(self.prefix_v or []), *self.cross_k, *self.cross_v]:
            if t is None or t.untyped_storage().data_ptr() in seen:
                continue
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
        return total
