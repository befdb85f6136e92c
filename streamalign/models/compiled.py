"""``--compile``: torch.compile of the generator's transformer blocks, with graphs reused across chunks.

Each block's forward runs two compiled regions around its self-attention (see
:class:`~streamalign.models.wan.Block`): ``qkv`` (modulation, LN1, q/k/v projections, q/k RMSNorm, RoPE; its
K/V-only variant ``kv`` for the clean-context refresh) and ``rest`` (o projection, gate, cross-attention,
FFN). Their inputs are the chunk's own tensors (x [B, c*T, dim], e0 [B, c, 6, dim], the chunk's RoPE
rotations [c*T, 1, head_dim/2], the text k/v [B or 1, text_len, heads, head_dim]), whose shapes are the same
for every chunk, whatever the cache holds. The attention over the cache stays eager between them: the keys
it reads grow chunk by chunk (a global cache) or change with the ring's slots (a rolling one), and it already
runs one fused kernel. The regions are compiled with ``dynamic=False``: one graph per region and input shape
(batch size, chunk tokens, grad mode), the same code for every block (their parameters are graph inputs), so
the number of graphs is bounded by the distinct batch shapes of a run, never by its chunks or layers, and
every model compiled in one process shares them (the backend is one object per process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

REGIONS = ("qkv", "kv", "rest")
# graphs per compiled region before torch falls back to eager (torch's default is 8): one per distinct input
# shape and grad mode, e.g. a rollout batch, a fork group's prefix and branch batches, a replay's rows
RECOMPILE_LIMIT = 64


@dataclass
class CompileStats:
    """What the compiled regions have compiled so far in this process for one backend (every model compiled
    with it shares them): graphs per region (one per input shape, dtype and grad mode) and the seconds the
    backend took for them (inductor's code generation and C++ compilation; a backward graph compiled at
    its first backward is not counted)."""

    backend: str
    graphs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REGIONS, 0))
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.graphs.values())


def _counting_backend(name: str, stats: CompileStats, region: str) -> Callable:
    """The backend `name` (``inductor``, ``eager``, ...) wrapped to count the graphs it is handed."""
    inner = torch._dynamo.lookup_backend(name)

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        stats.graphs[region] += 1
        t0 = time.perf_counter()
        try:
            return inner(gm, example_inputs)
        finally:
            stats.seconds += time.perf_counter() - t0

    return backend


# per backend name: the compiled region functions and their stats, one set per process. Dynamo guards on
# the backend object, so models compiled with one shared backend reuse each other's graphs (a merge sweep's
# six policies, evaluate's models: compiled once for their shapes, not once per model)
_COMPILED: dict[str, tuple[dict[str, Callable], CompileStats]] = {}


def compile_blocks(model: nn.Module, backend: str = "inductor") -> CompileStats:
    """Compile the regions of every block of `model` (a :class:`~streamalign.models.wan.CausalWanModel`) in
    place; returns the process's stats for `backend`, which its later forwards fill. Nothing is compiled
    until a block first runs (graphs are built lazily, one per input shape, and reused by every block and
    every model compiled here); fake tensors and measuring dispatch modes run eagerly."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks) or not all(hasattr(b, "compiled") for b in blocks):
        raise ValueError(f"--compile: {type(model).__name__} has no compilable transformer blocks")
    if backend not in _COMPILED:
        stats = CompileStats(backend)
        fns = {r: torch.compile(_FUNCTIONS[r], backend=_counting_backend(backend, stats, r), dynamic=False)
               for r in REGIONS}  # fmt: skip
        _COMPILED[backend] = fns, stats
        _raise_recompile_limit()
    fns, stats = _COMPILED[backend]
    for block in blocks:
        block.compiled = fns
    model.compile_stats = stats
    return stats


def reset_compiled() -> None:
    """Drop every compiled graph of this process (``torch._dynamo.reset``) and start the stats afresh;
    models compiled before recompile at their next forward (tests start from a known count)."""
    torch._dynamo.reset()
    for _fns, stats in _COMPILED.values():
        stats.graphs, stats.seconds = dict.fromkeys(REGIONS, 0), 0.0


# one plain function per region, the block its first argument: torch.compile caches graphs per code object,
# so every block shares one function's graphs (a block's parameters are inputs of the graph, not constants)
def _qkv(block: nn.Module, x: torch.Tensor, e0: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return block.qkv(x, e0, rope)


def _kv(block: nn.Module, x: torch.Tensor, e0: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return block.kv(x, e0, rope)


def _rest(block: nn.Module, x: torch.Tensor, attn: torch.Tensor, e0: torch.Tensor, text_k: torch.Tensor,
          text_v: torch.Tensor) -> torch.Tensor:  # fmt: skip
    return block.rest(x, attn, e0, text_k, text_v)


_FUNCTIONS = {"qkv": _qkv, "kv": _kv, "rest": _rest}


def _raise_recompile_limit() -> None:
    """Let each region keep up to RECOMPILE_LIMIT graphs (batch shapes), never lowering a larger limit."""
    cfg = torch._dynamo.config
    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, key) and getattr(cfg, key) < RECOMPILE_LIMIT:
            setattr(cfg, key, RECOMPILE_LIMIT)
            break


def uncompile_blocks(model: nn.Module) -> None:
    """Back to eager blocks (the compiled graphs are dropped with their wrappers)."""
    for block in getattr(model, "blocks", []):
        if hasattr(block, "compiled"):
            block.compiled = None
    model.__dict__.pop("compile_stats", None)


def is_compiled(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return bool(blocks) and getattr(blocks[0], "compiled", None) is not None
