"""The one few-step chunk sampler (Self-Forcing / DMD) used by collect, training, evaluation, generation.

Per chunk of `chunk_frames` latent frames: x = initial noise; for each step i of the schedule the
model predicts x0 (flow models: ``v = model(x, t_i)``, ``x0 = x - sigma_i v``; x0 models: the output);
if not the last step ``x = (1 - sigma_{i+1}) x0 + sigma_{i+1} eps_{i+1}`` (solver noise). The chunk
output is the last x0; the model then runs once on it at ``t = context_t`` (0) to write clean K/V for
the chunk. The schedule warps the step list onto the shift-s flow schedule: ``s = step / N``,
``sigma = shift s / (1 + (shift - 1) s)``, ``t = N sigma``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..schemas.buffer import GroupTensors
from ..schemas.config import ModelConfig, SamplerConfig
from .host_heap import keep_host_heap
from .kv_cache import KVBuffers, KVCache, compute_dtype, kv_bytes
from .noise import ForkNoise, NoiseBank, NoiseSource
from .protocol import ChunkModel
from .transfer import pins, to_device, to_host, wait_for_copies

# Fork-group branch batching (see Sampler.auto_branch_batch / branch_bytes). Without a device to ask
# (CPU, fake tensors) the branch batches may hold this many bytes beyond the weights and shared prefix:
# at full size a wan-1.3b group then peaks near 20 GiB at any pivot (a 40/48 GB card, with room for the
# text encoder or VAE), while a wan-14b branch alone needs ~26 GiB at pivot 0 (batches of 1).
DEFAULT_BRANCH_MEMORY = 24 * 2**30
# On CUDA a batch may take this fraction of the memory not in use (the rest: allocator rounding, fragmentation)
FREE_FRACTION = 0.9
# Plain rollout batches (evaluate, merge) hold at most this many videos (the fixed batch they had before
# batches were sized from memory: small models keep their batches, hence their numbers)
MAX_VIDEO_BATCH = 64
# float32 activations per token of one branch's chunk forward, in units of dim and ffn_dim
ACT_DIM_FLOATS = 8
ACT_FFN_FLOATS = 1
# Training replays (see Sampler.auto_replay_batch / replay_row_bytes): bytes the replay rows of one update
# may hold beyond the weights, optimizer and prefix when no device can be asked (CPU, fake tensors): the
# same bound as the branch batches, so on a CPU every row of a small model runs in one batch.
DEFAULT_REPLAY_MEMORY = DEFAULT_BRANCH_MEMORY
# float32 values per token of one block of one replay row, in units of dim and ffn_dim: its recomputation
# and backward under checkpointing, or what it saves for backward without (less). Checked against the cost
# of one more row at full size (wan-1.3b and wan-14b, pivot 1, bf16 autocast by CUDA's rules, which keep
# float32 LayerNorm inputs): 4.99 dim + 2.34 ffn, which these bound (estimates 1.02x / 1.01x the cost)
REPLAY_DIM_FLOATS = 5
REPLAY_FFN_FLOATS = 2.5


class _RowBatches(torch.autograd.Function):
    """Rows predicted in micro-batches (see :meth:`Sampler.predict_rows`): forward ``run(lo, hi)`` for
    every (lo, hi) of `bounds` without a graph; backward re-runs each under autograd (and the forward's
    autocast) and returns the parameters' gradients summed over the micro-batches."""

    @staticmethod
    def forward(ctx, run, bounds: list[tuple[int, int]], *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.bounds, ctx.params = run, bounds, params
        dev = params[0].device.type
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        with torch.no_grad():
            return torch.cat([run(lo, hi) for lo, hi in bounds])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dev, dtype, enabled = ctx.autocast
        total: list[torch.Tensor | None] = [None] * len(ctx.params)
        for lo, hi in ctx.bounds:
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                out = ctx.run(lo, hi)
            grads = torch.autograd.grad(out, ctx.params, grad[lo:hi], allow_unused=True)
            del out  # this micro-batch's graph is gone before the next one is built
            for i, g in enumerate(grads):
                if g is not None:
                    total[i] = g if total[i] is None else total[i].add_(g)
        return None, None, *total


@dataclass(frozen=True)
class Schedule:
    """Model timesteps ``t`` (0..N) and noise levels ``sigma = t / N`` of the denoising steps."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    num_train_timesteps: int = 1000

    @classmethod
    def from_config(cls, cfg: SamplerConfig) -> Schedule:
        n = cfg.num_train_timesteps
        sig = []
        for step in cfg.denoising_steps:
            s = step / n
            sig.append(cfg.shift * s / (1 + (cfg.shift - 1) * s) if cfg.warp else s)
        return cls(tuple(n * s for s in sig), tuple(sig), n)

    def __len__(self) -> int:
        return len(self.sigmas)


@dataclass
class ChunkTrace:
    """One denoised chunk. x0 [B, c, C, H, W]; with recording, x_t / x0s [B, T, c, C, H, W]:
    the input of every step and the model's x0 prediction at that step."""

    x0: torch.Tensor
    x_t: torch.Tensor | None = None
    x0s: torch.Tensor | None = None


@dataclass
class ForkGroup(GroupTensors):
    """A rollout forked at chunk `pivot` (0-based) into G branches: the group's tensors (shapes in
    :mod:`streamalign.schemas.buffer`; ``x0_old`` is this rollout's x0 prediction at every pivot step)
    and the seed and perturbation strength that made them."""

    pivot: int
    strength: float
    seed: int | None


@dataclass(frozen=True)
class Segment:
    """One scene of a multi-prompt rollout: text context [B or 1, L, D], its length in chunks, and
    whether it starts with a hard cut (KV flushed, positions restart) instead of a soft transition."""

    context: torch.Tensor
    num_chunks: int
    hard_cut: bool = False


class Sampler:
    def __init__(self, model: ChunkModel, config: ModelConfig) -> None:
        self.model = model
        self.config = config
        self.schedule = Schedule.from_config(config.sampler)
        self.chunk_frames = config.sampler.chunk_frames
        self.context_t = config.sampler.context_t
        # KV storage kept between the rollouts, fork groups and batches whose caches the sampler owns, one
        # per role ("main": a rollout's or a group's prefix cache; "branches": a group's branch batches)
        self._buffers: dict[str, KVBuffers] = {}
        self._driver_free: tuple[int, int] | None = None  # (free bytes the driver reported, reserved then)

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def chunk_shape(self) -> tuple[int, int, int, int]:
        lat = self.config.latent
        return (self.chunk_frames, lat.channels, lat.height, lat.width)

    def noise_bank(self, seeds: int | Sequence[int]) -> NoiseBank:
        """Noise of `seeds` (one per row), drawn into pinned memory when the model is on CUDA."""
        return NoiseBank(seeds, self.chunk_shape, pinned=pins(self._device()))

    def new_cache(
        self,
        batch: int,
        num_chunks: int | None = None,
        dtype: torch.dtype | None = None,
        history: int = 0,
        buffers: KVBuffers | None = None,
    ) -> KVCache:
        """A cache by the config's policy: rolling when a window is set, else global for `num_chunks`; in
        `dtype` (default the model's compute dtype: bf16 weights, bf16 cache); storage from `buffers`.
        `history`: extra ring slots of a rolling cache (older frames kept resident for KV routing; attention
        is unchanged)."""
        cc = self.config.cache
        frames = (num_chunks or self.config.num_chunks) * self.chunk_frames
        return KVCache.for_model(
            self.model,
            batch,
            self.config.tokens_per_frame,
            max_frames=None if cc.window is not None else frames,
            sink=cc.sink,
            window=cc.window,
            dtype=dtype,
            history=history,
            buffers=buffers,
            recompute_context=cc.recompute_context,
        )

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _reuses_storage(self) -> bool:
        """Whether owned caches reuse kept storage: on the CPU, with real weights. A fresh CPU cache per
        rollout is zero-filled new memory (page faults every time); CUDA's caching allocator already reuses
        freed blocks (and kept storage would hold device memory others need, e.g. the reward models);
        fake weights and measuring modes (plans, memory checks) see what a call allocates, as on a GPU."""
        p = next(self.model.parameters())
        return p.device.type == "cpu" and not is_fake(p) and _get_current_dispatch_mode() is None

    @contextmanager
    def _owned_buffers(self, role: str) -> Iterator[KVBuffers | None]:
        """The kept storage of `role` for the caches of one call (None: allocate as usual). Taken out while
        in use, so a concurrent or nested call of the same role gets fresh storage. On the CPU this also
        sets the host heap to keep freed memory (:func:`~streamalign.models.host_heap.keep_host_heap`)."""
        if not self._reuses_storage():
            yield None
            return
        keep_host_heap()  # the activations' memory too stays in the heap between forwards
        buffers = self._buffers.pop(role, None) or KVBuffers()
        try:
            yield buffers
        finally:
            self._buffers[role] = buffers

    # -- one chunk -----------------------------------------------------------------------------------
    def denoise_chunk(
        self,
        cache: KVCache,
        chunk: int,
        noise: NoiseSource,
        context: torch.Tensor | None,
        record: bool = False,
        noise_chunk: int | None = None,
        refresh: bool = True,
        ode: bool = False,
    ) -> ChunkTrace:
        """Denoise chunk `chunk` (frames chunk*c ...) against `cache`, then write its clean K/V.

        `noise_chunk` is the address used for the noise (defaults to `chunk`; differs after a hard cut).
        `ode`: re-noise with the noise the step's input implies, ``(x - (1 - sigma_i) x0) / sigma_i``, instead
        of solver noise (the deterministic DDIM path of the flow: the chunk is a function of its initial
        noise; the distillation teacher of :mod:`streamalign.worlds.shapes.distill`).
        Gradients flow if the caller enables them (training replays the pivot chunk with grad).
        """
        dev = self._device()
        nc = chunk if noise_chunk is None else noise_chunk
        start = chunk * self.chunk_frames
        x = to_device(noise.initial(nc), dev)  # contiguous: shared noise may be a stride-0 view
        xs, x0s = [], []
        sched = self.schedule
        for i, (t_i, s_i) in enumerate(zip(sched.timesteps, sched.sigmas, strict=True)):
            x0 = self.predict_x0(x, t_i, s_i, context, cache, start)
            if record:
                xs.append(x)
                x0s.append(x0)
            if i + 1 < len(sched):
                s_next = sched.sigmas[i + 1]
                eps = (x - (1.0 - s_i) * x0) / s_i if ode else to_device(noise.solver(nc, i + 1), dev)
                x = (1.0 - s_next) * x0 + s_next * eps
        if refresh:
            self._write_clean(cache, start, x0.detach(), context)
        if not record:
            return ChunkTrace(x0)
        return ChunkTrace(x0, torch.stack(xs, 1), torch.stack(x0s, 1))

    def predict_x0(
        self,
        x: torch.Tensor,
        t: float | torch.Tensor,
        sigma: float | torch.Tensor,
        context: torch.Tensor | None,
        cache: KVCache | None,
        start_frame: int,
    ) -> torch.Tensor:
        """The model's x0 prediction for a chunk x [B, c, C, H, W] at timestep t (noise level sigma), each a
        number or one value per sample [B] (training replays several steps in one batch).
        Flow models: ``x0 = x - sigma v`` computed in float64 (as the reference); x0 models: the output."""
        b, c = x.shape[:2]
        tt = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(b, c)
        out = self.model(x, tt, context, cache, start_frame=start_frame)
        if self.model.arch.prediction == "x0":
            return out.float()
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
        return (x.double() - s * out.double()).float()

    def predict_rows(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor | None,
        prefix: KVCache,
        start_frame: int,
        batch: int | None = None,
    ) -> torch.Tensor:
        """x0 predictions [N, c, C, H, W] for N rows x [N, c, C, H, W] of the chunk that starts at frame
        `start_frame`, at per-row timesteps t [N] and noise levels sigma [N] (float64), attending to the
        batch-1 `prefix` cache (read in place by every row, never copied or written: each forward gets a
        non-storing expansion, :meth:`KVCache.expand`) and the text context [1, L, D].

        Differentiable w.r.t. the model's trainable weights. `batch`: rows per forward (default: all N in
        one). With fewer, the forward runs micro-batch by micro-batch without a graph, and the backward
        re-runs each micro-batch with gradients and backpropagates its rows' share of the incoming
        gradient before the next: activations of one micro-batch at a time, the same gradient (summed
        micro-batch by micro-batch: equal to float rounding), for any loss of the predictions."""
        n = x.shape[0]
        b = n if batch is None else max(1, min(batch, n))

        def run(lo: int, hi: int) -> torch.Tensor:
            # a global prefix holds the frames before the chunk only: the expansion is as long as the chunk's end
            rows = prefix.expand(hi - lo, start_frame + x.shape[1], store=False)
            return self.predict_x0(x[lo:hi], t[lo:hi], sigma[lo:hi], context, rows, start_frame)

        if b == n:
            return run(0, n)
        bounds = [(lo, min(lo + b, n)) for lo in range(0, n, b)]
        params = [p for p in self.model.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
        if not params:
            return torch.cat([run(lo, hi) for lo, hi in bounds])
        return _RowBatches.apply(run, bounds, *params)

    def write_context(self, cache: KVCache, latents: torch.Tensor, context: torch.Tensor | None) -> None:
        """Write clean K/V for given latents [B, k*c, C, H, W] (chunks 0..k-1) in one t=context_t pass
        per chunk, as the sampler's refresh does (used to rebuild a prefix from stored context latents)."""
        c = self.chunk_frames
        for j in range(latents.shape[1] // c):
            self._write_clean(cache, j * c, latents[:, j * c : (j + 1) * c], context)

    @torch.no_grad()
    def _write_clean(self, cache: KVCache, start: int, x0: torch.Tensor, context: torch.Tensor | None) -> None:
        """Run the model on clean latents x0 [B, c, C, H, W] at t = context_t to write their K/V (only the
        K/V: the model's last block and head are not run, see ``CausalWanModel.forward(kv_only=True)``)."""
        dev = self._device()
        t = torch.full((x0.shape[0], x0.shape[1]), self.context_t, device=dev)
        self.model(x0.to(dev, torch.float32), t, context, cache, start_frame=start, kv_only=True)

    # -- rollouts ------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(
        self,
        context: torch.Tensor,
        noise: NoiseSource,
        num_chunks: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Generate `num_chunks` chunks; context [B or 1, L, D]. Returns latents [B, F, C, H, W]."""
        n = num_chunks or self.config.num_chunks
        if cache is not None:  # the caller's cache: every chunk's clean K/V is written (it may go on)
            return torch.cat([self.denoise_chunk(cache, j, noise, context).x0 for j in range(n)], dim=1)
        with self._owned_buffers("main") as buffers:
            own = self.new_cache(noise.initial(0).shape[0], n, buffers=buffers)
            # nothing reads the last chunk's clean K/V: its refresh is skipped
            chunks = [self.denoise_chunk(own, j, noise, context, refresh=j + 1 < n).x0 for j in range(n)]
            return torch.cat(chunks, dim=1)

    @torch.no_grad()
    def fork_group(
        self,
        context: torch.Tensor,
        bank: NoiseBank,
        pivot: int,
        group_size: int,
        strength: float = 0.5,
        num_chunks: int | None = None,
        fork: str = "initial",
        solver_steps: Sequence[int] | None = None,
        branch_batch: int | None = None,
        memory_budget: int | None = None,
        branches: tuple[int, int] | None = None,
    ) -> ForkGroup:
        """Roll out chunks < pivot once (batch 1), then G branches that differ only in the pivot chunk's
        initial noise (``fork="initial"``), or only in its solver noise at `solver_steps` (``"solver"``;
        default every step 1..T-1), through the remaining chunks. `bank` has one seed; context [1, L, D].

        The branches attend to the batch-1 prefix KV without copies of it (:meth:`KVCache.expand`) and
        run in batches of `branch_batch` branches (default: as many as `memory_budget` bytes allow, see
        :meth:`auto_branch_batch`); each batch's KV is freed before the next starts. Branch i's output does
        not depend on the batching: it equals an independent rollout fed the same noises.

        `branches` (start, stop): roll out only those branches of the group (one rank's share of a group
        split over ranks); the per-branch tensors then hold those rows, in batches that are the whole
        group's batches cut at start and stop (so a share whose bounds fall on batch bounds gives the
        whole group's bytes)."""
        n = num_chunks or self.config.num_chunks
        if len(bank.seeds) != 1:
            raise ValueError("fork_group takes a NoiseBank with exactly one seed")
        if not 0 <= pivot < n:
            raise ValueError(f"pivot {pivot} is outside chunks 0..{n - 1}")
        if group_size < 1:
            raise ValueError(f"group size must be >= 1, got {group_size}")
        if branch_batch is not None and branch_batch < 1:
            raise ValueError(f"branch_batch must be >= 1, got {branch_batch}")
        first, last = branches or (0, group_size)
        if not 0 <= first < last <= group_size:
            raise ValueError(f"branches {first}..{last - 1} are outside the group of {group_size}")
        if fork == "initial":
            noise = ForkNoise(bank, pivot, torch.cat([bank.delta(pivot, i) for i in range(group_size)]), strength)
        elif fork == "solver":
            steps = list(solver_steps) if solver_steps is not None else list(range(1, len(self.schedule)))
            if not steps or not all(1 <= k < len(self.schedule) for k in steps):
                raise ValueError(f"solver fork steps must lie in 1..{len(self.schedule) - 1}, got {steps}")
            deltas = {k: torch.cat([bank.draw(pivot, k, i) for i in range(group_size)]) for k in steps}
            noise = ForkNoise(bank, pivot, None, strength, solver_deltas=deltas)
        else:
            raise ValueError(f"fork must be 'initial' or 'solver', got {fork!r}")
        c = self.chunk_frames
        # the batch-1 prefix cache holds only the prefix; each branch batch gets its own frames' storage
        with self._owned_buffers("main") as prefix_buffers, self._owned_buffers("branches") as branch_buffers:
            prefix_cache = self.new_cache(1, pivot, buffers=prefix_buffers) if pivot > 0 else None
            prefix = [self.denoise_chunk(prefix_cache, j, bank, context).x0 for j in range(pivot)]
            bb = branch_batch or self.auto_branch_batch(group_size, pivot, n, memory_budget)
            x_t, x0s, latents = [], [], []
            for start in range(first - first % bb, last, bb):
                lo, hi = max(start, first), min(start + bb, last)
                sub = noise.branches(lo, hi)
                if prefix_cache is not None:
                    cache = prefix_cache.expand(hi - lo, n * c, buffers=branch_buffers)
                else:
                    cache = self.new_cache(hi - lo, n, buffers=branch_buffers)
                # the last chunk's clean K/V (its refresh) would be read by nothing
                trace = self.denoise_chunk(cache, pivot, sub, context, record=True, refresh=pivot + 1 < n)
                rest = [trace.x0]
                rest += [self.denoise_chunk(cache, j, sub, context, refresh=j + 1 < n).x0 for j in range(pivot + 1, n)]
                # to the host without waiting (on CUDA: into pinned memory); the host waits once per group
                x_t.append(to_host(trace.x_t))
                x0s.append(to_host(trace.x0s))
                latents.append(to_host(torch.cat(rest, dim=1)))
                del cache, trace, rest  # this batch's KV and outputs leave the device before the next batch
            prefix_host = to_host(torch.cat(prefix, dim=1)[0]) if prefix else None
            wait_for_copies(self._device())
        init_noise, solver_noise = bank.shared(n, len(self.schedule))
        x_t_all = torch.cat(x_t)
        ctx = prefix_host if prefix_host is not None else torch.zeros(0, *self.chunk_shape[1:])
        return ForkGroup(
            pivot=pivot,
            strength=strength,
            seed=bank.seeds[0],
            context=ctx,
            eps_star=bank.initial(pivot)[0],
            branch_noise=x_t_all[:, 0],  # the pivot step-0 input is the branch noise
            init_noise=init_noise,
            solver_noise=solver_noise,
            x_t=x_t_all,
            x0_old=torch.cat(x0s),
            branch_latents=torch.cat(latents),
        )

    # -- memory of fork groups and batches ------------------------------------------------------------
    def _row_bytes(self, kv_frames: int, chunks: int) -> int:
        """Device bytes of one more batch row holding `kv_frames` frames of its own K/V and `chunks` float32
        chunks (outputs, recorded steps), plus the activations of one chunk forward.

        Activations per row, for n = chunk_frames * tokens_per_frame tokens, are bounded by
        ``n * (ACT_DIM_FLOATS * dim + ACT_FFN_FLOATS * ffn_dim) * 4`` bytes: the float32 q/k RMSNorm and
        RoPE temporaries, the float32 LSE-merge accumulator, the FFN hidden state. The constants are
        checked against the fake-tensor tracker at full size (tests/test_fullsize_memory.py)."""
        arch, c, tpf = self.model.arch, self.chunk_frames, self.config.tokens_per_frame
        kv = kv_bytes(arch.num_layers, kv_frames, tpf, arch.num_heads, arch.head_dim, compute_dtype(self.model))
        act = c * tpf * (ACT_DIM_FLOATS * arch.dim + ACT_FFN_FLOATS * arch.ffn_dim) * 4
        return kv + act + chunks * math.prod(self.chunk_shape) * 4

    def branch_bytes(self, pivot: int, num_chunks: int | None = None) -> int:
        """Device bytes one more branch adds to a batch of a fork group at `pivot` (an upper estimate):
        its own KV (the frames after the prefix, in the cache dtype; a rolling cache's ring at most) plus
        the activations of one chunk forward and the chunk's recorded float32 step inputs / predictions
        and its output chunks (see :meth:`_row_bytes`)."""
        n = num_chunks or self.config.num_chunks
        c, cc = self.chunk_frames, self.config.cache
        prefix_frames = pivot * c
        # global: the frames after the prefix; rolling: the ring, plus the sink frames the prefix lacks
        own = n * c - prefix_frames if cc.window is None else cc.sink + cc.window - min(prefix_frames, cc.sink)
        return self._row_bytes(own, 2 * len(self.schedule) + (n - pivot))

    def video_bytes(self, num_chunks: int | None = None) -> int:
        """Device bytes one more video adds to a batch of plain rollouts (evaluate, merge): its KV cache
        (every frame, or the rolling cache's sink + window), the activations of one chunk forward and its
        output chunks (twice: the list and the concatenated video)."""
        n = num_chunks or self.config.num_chunks
        cc = self.config.cache
        frames = n * self.chunk_frames if cc.window is None else cc.sink + cc.window
        return self._row_bytes(frames, 2 * n)

    def auto_branch_batch(
        self, group_size: int, pivot: int, num_chunks: int | None = None, memory_budget: int | None = None
    ) -> int:
        """How many branches of a fork group run at once: ``memory_budget // branch_bytes`` in 1..G.

        `memory_budget` is the bytes the branch batches may add on top of what is held when they start
        (weights, the prefix KV). Default: on CUDA, FREE_FRACTION (90%) of the device memory not in use (free
        plus cached by PyTorch's allocator but unallocated); elsewhere (CPU, fake tensors) ``DEFAULT_BRANCH_MEMORY``."""
        budget = memory_budget if memory_budget is not None else self.free_memory()
        return max(1, min(group_size, budget // self.branch_bytes(pivot, num_chunks)))

    def auto_batch(self, count: int, num_chunks: int | None = None, memory_budget: int | None = None) -> int:
        """How many of `count` videos a plain rollout batch holds: ``memory_budget // video_bytes`` in
        1..min(count, MAX_VIDEO_BATCH) (`memory_budget` as in :meth:`auto_branch_batch`)."""
        budget = memory_budget if memory_budget is not None else self.free_memory()
        return max(1, min(count, MAX_VIDEO_BATCH, budget // self.video_bytes(num_chunks)))

    def replay_row_bytes(self, pivot: int) -> int:
        """Device bytes one more row adds to a training replay (forward + backward) of the chunk at `pivot`
        (an upper estimate). Per token of the chunk: with activation checkpointing
        (``model.gradient_checkpointing``) every block's input in the compute dtype plus one block's
        activations and gradients (``REPLAY_DIM_FLOATS * dim + REPLAY_FFN_FLOATS * ffn_dim`` float32);
        without, those activations for every block. Plus the attention backward's keys and values of the
        row (prefix + own, and their gradients) and the row's float32 inputs / outputs. The constants are
        checked against the fake-tensor tracker at full size (tests/test_fullsize_train_memory.py)."""
        arch, c, cc = self.model.arch, self.chunk_frames, self.config.cache
        tpf, item = self.config.tokens_per_frame, compute_dtype(self.model).itemsize
        tokens = c * tpf
        block = int(tokens * (REPLAY_DIM_FLOATS * arch.dim + REPLAY_FFN_FLOATS * arch.ffn_dim) * 4)
        if getattr(self.model, "gradient_checkpointing", False):
            acts = arch.num_layers * tokens * arch.dim * item + block
        else:
            acts = arch.num_layers * block
        frames = (pivot + 1) * c if cc.window is None else min((pivot + 1) * c, cc.sink + cc.window)
        keys = 4 * frames * tpf * arch.dim * item  # k, v and their gradients over every key the chunk reads
        return acts + keys + 4 * math.prod(self.chunk_shape) * 4

    def auto_replay_batch(self, rows: int, pivot: int, memory_budget: int | None = None) -> int:
        """Rows of a training replay per forward/backward: at most ``memory_budget // replay_row_bytes``,
        in as few micro-batches as that allows, balanced (16 rows that fit 15 at once: 8 + 8).
        `memory_budget`: bytes the rows may hold on top of what is held when the replay starts (weights,
        optimizer, the prefix KV); default as :meth:`free_memory` (``DEFAULT_REPLAY_MEMORY`` without a
        device to ask)."""
        budget = memory_budget if memory_budget is not None else self.free_memory(DEFAULT_REPLAY_MEMORY)
        most = max(1, min(rows, budget // self.replay_row_bytes(pivot)))
        return math.ceil(rows / math.ceil(rows / most))

    def free_memory(self, default: int = DEFAULT_BRANCH_MEMORY) -> int:
        """Bytes the sampler may still allocate on the model's device (see :meth:`auto_branch_batch`);
        `default` where there is no device to ask.

        The driver is asked once per sampler (``mem_get_info`` waits for the device); later calls take the
        free memory it reported less what PyTorch has reserved since, plus what PyTorch holds unused now."""
        dev = self._device()
        if dev.type == "cuda" and torch.cuda.is_available():
            reserved = torch.cuda.memory_reserved(dev)
            if self._driver_free is None:
                self._driver_free = (torch.cuda.mem_get_info(dev)[0], reserved)
            free_then, reserved_then = self._driver_free
            free = max(0, free_then - (reserved - reserved_then))
            idle = reserved - torch.cuda.memory_allocated(dev)
            return int(FREE_FRACTION * (free + idle))
        return default

    @torch.no_grad()
    def generate(
        self,
        segments: Sequence[Segment],
        noise: NoiseSource,
        cache: KVCache | None = None,
        final_refresh: bool | None = None,
    ) -> torch.Tensor:
        """Multi-scene rollout (long videos: give a rolling cache). A soft transition keeps the KV cache
        and swaps the cross-attention text; a hard cut flushes the KV and restarts frame positions, so the
        new scene does not depend on anything before it. Noise is addressed by the global chunk index.
        Clean K/V are written for every chunk something reads: not for the chunk before a hard cut, nor for
        the last chunk unless `final_refresh` (default: when the caller gives the cache, which may go on).
        Returns [B, F_total, C, H, W]."""
        if not segments:
            raise ValueError("no segments to generate")
        b = noise.initial(0).shape[0]
        if cache is not None:
            return self._run_segments(segments, noise, cache, final_refresh is not False)
        total = sum(s.num_chunks for s in segments)
        longest = max(s.num_chunks for s in segments) if all(s.hard_cut for s in segments[1:]) else total
        with self._owned_buffers("main") as buffers:
            return self._run_segments(segments, noise, self.new_cache(b, longest, buffers=buffers), bool(final_refresh))

    def _run_segments(
        self, segments: Sequence[Segment], noise: NoiseSource, cache: KVCache, final_refresh: bool
    ) -> torch.Tensor:
        # the global index of each chunk whose clean K/V nothing reads (before a hard cut, or the last one)
        ends = [sum(s.num_chunks for s in segments[:k]) - 1 for k, s in enumerate(segments) if k and s.hard_cut]
        unread = {*ends, *([] if final_refresh else [sum(s.num_chunks for s in segments) - 1])}
        out, g, local = [], 0, 0
        for k, seg in enumerate(segments):
            if k > 0:
                cache.reset_cross()
                if seg.hard_cut:
                    cache.clear()
                    local = 0
            for _ in range(seg.num_chunks):
                refresh = g not in unread
                out.append(self.denoise_chunk(cache, local, noise, seg.context, noise_chunk=g, refresh=refresh).x0)
                g, local = g + 1, local + 1
        return torch.cat(out, dim=1)
