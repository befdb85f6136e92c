"""Memory (and FLOPs) of real stage code at full size, measured without the memory: fake tensors.

A :class:`LiveBytes` dispatch mode sees every tensor an aten op returns and keeps a weak reference to
its ``untyped_storage()``: the storage's bytes count as live from the op that created it until Python
frees it (the weakref callback), so ``peak`` is the largest number of bytes held at once, at the
granularity of one aten op (a fused kernel's internal scratch, e.g. flash attention's per-block
buffers, is invisible; it is small by design). Views and in-place results share their storage and are
counted once. The same mode works on real tensors, which is how it is validated
(``tests/test_fullsize_memory.py``: fake vs real peak at reduced width, and vs the allocator).

Full size without a GPU: :func:`fake_generator` builds :class:`~streamalign.models.wan.CausalWanModel`
on the meta device and gives it fake CPU parameters under ``FakeTensorMode`` (no bytes allocated), so
the REAL sampler code runs on it with shapes, dtypes and aliasing exactly as on a device.
``torch.distributed._tools.mem_tracker.MemTracker`` is not used: it refuses modules called more than
once, as every sampler step calls the model.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from ..schemas.config import ModelConfig
from . import wan  # noqa: F401  (registers the wan family)
from .kv_cache import ALLOCATING
from .protocol import ChunkModel, get_family
from .sampler import Sampler

GiB = 2**30
CUDA_RESERVE = 1 * GiB  # CUDA context + cuBLAS/cuDNN workspaces, outside PyTorch's allocator
# under HostLogic, a tensor made from nothing (a factory) with at most this many elements is real: indices,
# masks, counters, small tables; anything larger (weights, caches, activations, noise) is simulated
REAL_FACTORY_NUMEL = 4096


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def flash_backward_workspace(query: torch.Tensor) -> int:
    """Bytes of float32 scratch FlashAttention-2's backward allocates inside the kernel call (PyTorch's
    ``flash_api.cpp`` ``mha_bwd``, non-deterministic): ``dq_accum`` [B, Lq rounded to 128, H, D rounded to 32
    (to 256 above 192)] and ``softmax_d`` [B, H, Lq rounded to 128], for `query` [B, H, Lq, D] (SDPA's
    layout). Freed when the call returns, so a dispatch-level tracker sees it only as this estimate."""
    b, h, lq, d = query.shape
    lq, d = _round_up(lq, 128), _round_up(d, 32) if d <= 192 else 256
    return 4 * (b * lq * h * d + b * h * lq)


# fused kernels' scratch on CUDA, by the op a fake-CPU simulation dispatches in its place: bytes from the
# op's arguments (CPU's flash backward stands for CUDA's, which takes the same q layout first after dout)
def _flash_backward_op_workspace(dout: torch.Tensor, query: torch.Tensor, *_: Any) -> int:
    return flash_backward_workspace(query)


CUDA_WORKSPACES: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _flash_backward_op_workspace,
    torch.ops.aten._scaled_dot_product_flash_attention_backward.default: _flash_backward_op_workspace,
}


class LiveBytes(TorchDispatchMode):
    """Live and peak storage bytes of the tensors created inside the mode (plus those given to
    :meth:`track`, e.g. weights that exist before it is entered). Units: bytes.

    ``current``: bytes of tracked storages alive now; ``peak``: the maximum of ``current`` after any op;
    ``largest``: the largest single storage seen (bytes), for reports. `device`: count only storages on
    that device type (e.g. ``"cpu"``, the accelerator's stand-in under fake tensors, while decoded videos
    go to the ``"meta"`` host stand-in); None counts every storage. `workspaces`: a table of fused kernels'
    internal scratch (:data:`CUDA_WORKSPACES`, when simulating CUDA), counted on top of ``current`` at the
    op that allocates it (it lives only during the call); ``workspace`` is the largest seen.
    """

    def __init__(self, device: str | None = None, workspaces: dict[Any, Callable[..., int]] | None = None) -> None:
        super().__init__()
        self.device = device
        self.workspaces = workspaces or {}
        self.workspace = 0
        self._refs: dict[int, tuple[weakref.ref, int]] = {}  # id(storage) -> (weakref, bytes counted)
        self.current = 0
        self.peak = 0
        self.largest = 0

    # -- book-keeping ----------------------------------------------------------------------------------
    def _free(self, key: int, _ref: weakref.ref) -> None:
        _, nbytes = self._refs.pop(key, (None, 0))
        self.current -= nbytes

    def _add(self, t: torch.Tensor) -> None:
        # meta tensors hold no bytes (a fake tensor reports its fake device): the planner's host stand-in
        if t.device.type == "meta" or (self.device is not None and t.device.type != self.device):
            return
        st = t.untyped_storage()
        key = id(st)
        nbytes = st.nbytes()
        known = self._refs.get(key)
        if known is not None and known[0]() is st:
            if known[1] != nbytes:  # resize_ / set_ changed the storage in place
                self.current += nbytes - known[1]
                self._refs[key] = (known[0], nbytes)
            return
        # storage python objects are preserved while any tensor holds the storage, so the weakref dies
        # exactly when the bytes are released
        self._refs[key] = (weakref.ref(st, lambda r, k=key: self._free(k, r)), nbytes)
        self.current += nbytes
        self.largest = max(self.largest, nbytes)

    def track(self, *tensors: torch.Tensor | Iterable[torch.Tensor]) -> LiveBytes:
        """Count tensors created before the mode was entered (weights, inputs) as live."""
        for t in tensors:
            for x in [t] if isinstance(t, torch.Tensor) else t:
                self._add(x)
        self.peak = max(self.peak, self.current)
        return self

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "prim":  # metadata queries (fake tensors ask for .device often): no storage
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        scratch = self.workspaces[func](*args) if func in self.workspaces else 0
        self.workspace = max(self.workspace, scratch)
        self.peak = max(self.peak, self.current + scratch)
        return out


class HostLogic(TorchDispatchMode):
    """Entered on top of a :class:`FakeTensorMode`: the host-side logic of a stage runs on real values
    while the device work stays simulated, so code that reads values (rewards and advantages, anchor
    draws, boolean-mask indexing -- of fake tensors too, by real masks --, an optimizer's step counter) runs
    unchanged on fake weights.

    An op whose tensor arguments are all real runs for real; a factory (no tensor arguments) is real when
    its result has at most ``REAL_FACTORY_NUMEL`` elements, unless a K/V cache allocates it (device state, however
small: :data:`~streamalign.models.kv_cache.ALLOCATING`); every other op is fake. A value read from a
    fake tensor is not computed: a number (``float(loss)``) is NaN and a truth value is refused (the
    branch a real run takes is unknown) -- unless `healthy`: for code whose only reads of device values
    are statistics and health checks (``isfinite(loss)``, a finite gradient norm), numbers read 0.0 and
    truth values True, so the simulation takes a healthy step's path (its statistics mean nothing). An op
    that would write fake data into a real tensor is refused (the simulation would lose the write)."""

    def __init__(self, healthy: bool = False) -> None:
        super().__init__()
        self.healthy = healthy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "prim":  # metadata queries of fake tensors
            return func(*args, **kwargs)
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        if len(tensors) < len(args) + len(kwargs):  # tensors inside lists (cat, foreach ops, indices)
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = [isinstance(t, FakeTensor) for t in tensors]
        if func is torch.ops.aten._local_scalar_dense.default and fake[0]:
            if tensors[0].is_floating_point():
                return 0.0 if self.healthy else math.nan
            if tensors[0].dtype == torch.bool and self.healthy:
                return True
            raise RuntimeError(f"simulated run: control flow reads a {tensors[0].dtype} value of a fake tensor")
        if func is torch.ops.aten.index.Tensor and fake[0] and not any(fake[1:]):
            # a fake tensor indexed by real boolean masks: their coordinates (real, exact) instead, so the
            # result's shape is known (a boolean mask's count would be data-dependent to a fake mode)
            indices = []
            for i in args[1]:
                if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                    with _disable_current_modes():
                        indices.extend(i.nonzero(as_tuple=True))
                else:
                    indices.append(i)
            return func(args[0], indices)
        if any(fake):
            if func._schema.is_mutable:
                for a in func._schema.arguments:
                    x = kwargs.get(a.name) if a.kwarg_only else None
                    if not a.kwarg_only:
                        i = func._schema.arguments.index(a)
                        x = args[i] if i < len(args) else kwargs.get(a.name)
                    written = a.alias_info is not None and a.alias_info.is_write
                    if written and isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
                        raise RuntimeError(f"simulated run: {func} would write simulated data into a real tensor")
            return func(*args, **kwargs)
        if tensors:
            with _disable_current_modes():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)  # a factory: shapes first (fake, free), then real if small
        leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if leaves and not ALLOCATING.get() and sum(t.numel() for t in leaves) <= REAL_FACTORY_NUMEL:
            with _disable_current_modes():
                return func(*args, **kwargs)
        return out


@dataclass
class MemoryReport:
    """What one measured call held: bytes live before it (``baseline``), at most during it (``peak``),
    after it (``final``); FLOPs if counted; wall seconds of the (simulated) call."""

    peak: int
    baseline: int
    final: int
    largest: int
    seconds: float
    flops: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def gib(self) -> float:
        return self.peak / GiB

    def __str__(self) -> str:
        fl = f", {self.flops / 1e15:.2f} PFLOP" if self.flops is not None else ""
        return (
            f"peak {self.peak / GiB:.2f} GiB (baseline {self.baseline / GiB:.2f}, largest tensor "
            f"{self.largest / GiB:.2f}){fl}, simulated in {self.seconds:.1f} s"
        )


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash kernel (FlopCounterMode knows only the CUDA variants): 2 matmuls,
    q [B, H, Lq, D] x k [B, H, Lk, D] and p [B, H, Lq, Lk] x v [B, H, Lk, Dv], 2 FLOPs per MAC."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * (d + dv)


class _NoModules:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP is counted under "Global" only."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _NoModules:
        return self

    def __exit__(self, *exc) -> None:
        return None


class GlobalFlops(FlopCounterMode):
    """``FlopCounterMode`` (its formulas, plus `custom_mapping`) without the per-module breakdown: the
    module tracker hooks every module's outputs for the backward, which keeps activations alive that
    activation checkpointing frees, so a memory measurement under it would be wrong."""

    def __init__(self, custom_mapping: dict | None = None) -> None:
        super().__init__(display=False, custom_mapping=custom_mapping)
        self.mod_tracker = _NoModules()


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kw) -> int:
    """FLOPs of the CPU flash kernel's backward (recomputed scores, then 4 products): the formula torch
    uses for the CUDA kernels, [B, H, L, D] layouts."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def measure(
    fn: Callable[[], Any], track: Iterable[torch.Tensor] = (), flops: bool = False, tracker: LiveBytes | None = None
) -> tuple[Any, MemoryReport]:
    """Run ``fn()`` under :class:`LiveBytes` (`tracker`, default a new one; and ``FlopCounterMode`` if
    `flops`); `track` are tensors alive before the call (weights, inputs) that count towards the peak.
    Returns (result, report)."""
    tracker = tracker if tracker is not None else LiveBytes()
    tracker.track(list(track))
    baseline = tracker.current
    counter = None
    t0 = time.perf_counter()
    if flops:
        # FlopCounterMode looks formulas up by overload packet
        forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        counter = GlobalFlops({forward: _sdpa_cpu_flops, backward: _sdpa_cpu_backward_flops})
        with counter, tracker:
            out = fn()
    else:
        with tracker:
            out = fn()
    seconds = time.perf_counter() - t0
    report = MemoryReport(
        peak=tracker.peak,
        baseline=baseline,
        final=tracker.current,
        largest=tracker.largest,
        seconds=seconds,
        flops=counter.get_total_flops() if counter is not None else None,
    )
    return out, report


def fake_module(build: Callable[[], torch.nn.Module], dtype: torch.dtype, mode: FakeTensorMode) -> torch.nn.Module:
    """``build()`` on the meta device (no init cost), cast to `dtype`, in eval mode without gradients,
    then given storage-less fake CPU parameters and buffers under `mode` (which must allow non-fake
    inputs: the meta tensors are the templates). Tied parameters stay tied (``to_empty`` would untie
    them, e.g. a transformers encoder's shared embedding). Shapes and dtypes are the real ones."""
    with torch.device("meta"):
        module = build()
    module = module.to(dtype).eval().requires_grad_(False)
    made: dict[int, torch.Tensor] = {}
    with mode:
        for sub in module.modules():
            for kind in ("_parameters", "_buffers"):
                table = getattr(sub, kind)
                for name, t in table.items():
                    if t is None:
                        continue
                    if id(t) not in made:
                        empty = torch.empty_like(t, device="cpu")
                        made[id(t)] = torch.nn.Parameter(empty, requires_grad=False) if kind == "_parameters" else empty
                    table[name] = made[id(t)]
    return module


def meta_generator(cfg: ModelConfig, dtype: torch.dtype) -> ChunkModel:
    """The generator of `cfg` on the meta device (no storage, no init cost), parameters of `dtype`, frozen."""
    with torch.device("meta"):
        model = get_family(cfg.arch.family).build(cfg.arch)
    return model.to(dtype).eval().requires_grad_(False)


def materialize_fake(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """Give every parameter and buffer of a meta `module` fake CPU storage of `mode`, IN PLACE: the tensor
    objects stay the same (``swap_tensors``), so an optimizer, a trainer or a list that already holds
    them sees the fake tensors. Shapes, dtypes and ``requires_grad`` are kept."""
    for t in [*module.parameters(), *module.buffers()]:
        grad = t.requires_grad
        with mode:  # a factory, not empty_like(t): the fake mode would keep a weak reference to t
            fake = torch.empty(t.shape, dtype=t.dtype, device="cpu")
        torch.utils.swap_tensors(t, fake)
        t.requires_grad_(grad)
    return module


def fake_generator(cfg: ModelConfig, dtype: torch.dtype, mode: FakeTensorMode) -> ChunkModel:
    """The generator of `cfg` with fake CPU parameters of `dtype` (:func:`fake_module`)."""
    return fake_module(lambda: get_family(cfg.arch.family).build(cfg.arch), dtype, mode)


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of `tensors` (a module's weights: shared ones once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def fake_sampler(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> tuple[Sampler, FakeTensorMode]:
    """A :class:`Sampler` over :func:`fake_generator`, and the fake mode to run it under."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    return Sampler(fake_generator(cfg, dtype, mode), cfg), mode


def fork_group_memory(
    cfg: ModelConfig,
    pivot: int,
    group_size: int = 12,
    dtype: torch.dtype = torch.bfloat16,
    text_tokens: int = 512,
    flops: bool = False,
    **fork_kwargs: Any,
) -> MemoryReport:
    """Peak bytes of one REAL :meth:`Sampler.fork_group` call at `cfg`'s full size, on fake tensors.

    The weights ([`dtype`], counted as live from the start) and a text context [1, text_tokens,
    text_dim] (float32, as the text encoders return it) are inputs; everything the sampler allocates
    (KV caches, activations, noise, the returned group) is measured. `fork_kwargs` go to fork_group
    (e.g. ``branch_batch``, ``memory_budget``)."""
    sampler, mode = fake_sampler(cfg, dtype)
    model = sampler.model
    with mode:
        text = torch.zeros(1, text_tokens, cfg.arch.text_dim)
    weights = [*model.parameters(), *model.buffers()]
    with mode:
        _, report = measure(
            lambda: sampler.fork_group(text, sampler.noise_bank(0), pivot, group_size, **fork_kwargs),
            track=[*weights, text],
            flops=flops,
        )
    report.notes.update(
        model=cfg.name,
        pivot=pivot,
        group_size=group_size,
        dtype=str(dtype).removeprefix("torch."),
        weights_bytes=storage_bytes(weights),
    )
    return report
