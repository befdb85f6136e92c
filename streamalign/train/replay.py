"""Replay of a stored fork group's pivot chunk under the current policy, with gradients.

The prefix (chunks before the pivot) is context only: its KV is rebuilt without grad from the stored
clean context latents under the current policy (``context="recompute"``), or taken from the KV stored
with the entry (``"stored"``, the rollout policy's), once per call, and every row reads it in place. The
pivot chunk's step inputs ``x_t`` are then run through the same :class:`~streamalign.models.sampler.Sampler`
that generated them as (branch, step) rows, ``batch`` rows per forward/backward (default: as many as the
memory budget allows, see :meth:`~streamalign.models.sampler.Sampler.auto_replay_batch`), so gradients
flow only through the pivot chunk and the update does not depend on the batching.
"""

from __future__ import annotations

import torch

from ..models.kv_cache import KVCache
from ..models.sampler import Sampler
from ..schemas.buffer import Entry
from .old_policy import OldPolicy, loaded_weights
from .shard import Lockstep

CONTEXT_MODES = ("recompute", "stored")


class PivotReplay:
    """x0 predictions of a policy at an entry's pivot chunk. ``sampler`` wraps the (LoRA-adapted) model."""

    def __init__(
        self, sampler: Sampler, context: str = "recompute", batch: int | None = None, memory_budget: int | None = None
    ) -> None:
        if context not in CONTEXT_MODES:
            raise ValueError(f"--context must be one of {', '.join(CONTEXT_MODES)}, got {context!r}")
        if batch is not None and batch < 1:
            raise ValueError(f"--replay-batch must be >= 1, got {batch}")
        self.sampler = sampler
        self.context = context
        self.batch = batch
        self.memory_budget = memory_budget
        self.last_batch: int | None = None  # rows per forward of the last predict (reports)
        self.lockstep = False  # --shard-base: every rank runs the same model passes (see train/shard.py)
        self.old: OldPolicy | None = None  # the old policies' weights (see train/old_policy.py)
        self.recompute_old = False  # set per entry by the trainer: recompute its old predictions

    def prefix_cache(self, pivot: int) -> KVCache:
        """An empty batch-1 cache for the prefix of a replay at `pivot`: a global cache holds the `pivot`
        chunks before it and nothing more (the replay's rows never store the pivot chunk: non-storing
        expansions, :meth:`~streamalign.models.sampler.Sampler.predict_rows`); at pivot 0 it holds nothing at
        all, whatever the cache policy (a chunk at frame 0 reads only itself). A rolling cache keeps its ring."""
        s = self.sampler
        if pivot == 0 or s.config.cache.window is None:
            return KVCache.for_model(s.model, 1, s.config.tokens_per_frame, max_frames=pivot * s.chunk_frames)
        return s.new_cache(1, pivot)

    @torch.no_grad()
    def prefix(self, entry: Entry, text: torch.Tensor) -> KVCache:
        """A batch-1 cache holding the clean prefix of `entry` (text [1, L, D])."""
        s = self.sampler
        cache = self.prefix_cache(entry.pivot)
        passes = entry.pivot if self.context == "recompute" else 0
        if self.lockstep:  # forwards of the prefix (one per chunk), up to the longest of any rank: thrown away
            for _ in range(Lockstep.most(passes)[0] - passes):
                s.write_context(s.new_cache(1, 1), torch.zeros(1, *entry.eps_star.shape), text)
        if entry.pivot == 0:
            return cache
        if self.context == "stored":
            if not entry.kv:
                raise ValueError(
                    f"entry {entry.entry_id} has no stored KV: collect with --store-kv or use --context recompute"
                )
            n = s.model.arch.num_layers
            cache.load_prefix([entry.kv[f"k.{i}"] for i in range(n)], [entry.kv[f"v.{i}"] for i in range(n)])
        else:
            s.write_context(cache, entry.context.unsqueeze(0).float(), text)
        return cache

    def predict(
        self, entry: Entry, text: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor, cache: KVCache | None = None
    ) -> torch.Tensor:
        """x0 [N, c, C, H, W] for pivot-chunk inputs x_t [N, c, C, H, W] at schedule step indices `steps` [N];
        differentiable w.r.t. the model's trainable weights (the prefix is not; the text k/v are recomputed
        inside the graph, so cross-attention LoRA gets gradients)."""
        s = self.sampler
        cache = cache if cache is not None else self.prefix(entry, text)
        t = torch.tensor(s.schedule.timesteps, dtype=torch.float32)[steps]
        sigma = torch.tensor(s.schedule.sigmas, dtype=torch.float64)[steps]
        dev = next(s.model.parameters()).device
        n = x_t.shape[0]
        batch = self.batch or s.auto_replay_batch(n, entry.pivot, self.memory_budget)
        if self.lockstep:  # one number of micro-batches on every rank
            batch = Lockstep.rows_batch(n, batch)
        self.last_batch = batch
        return s.predict_rows(
            x_t.to(dev, torch.float32), t.to(dev), sigma.to(dev), text, cache, entry.pivot * s.chunk_frames, batch
        )

    def old_predict(
        self, entry: Entry, text: torch.Tensor, x_t: torch.Tensor, steps: torch.Tensor, stored: torch.Tensor
    ) -> torch.Tensor | None:
        """The old policy's x0 predictions [N, c, C, H, W] of the rows :meth:`predict` is about to replay
        (same arguments), without gradients; call it BEFORE that predict (its weights are swapped in place).
        `stored`: the entry's stored predictions of those rows, returned when they are not recomputed
        (``recompute_old`` off, or the entry's policy is not one this run knows). None: the old policy's
        weights are the current ones, so its predictions are the current predict's, detached (bit for bit
        what the recomputation would give: the same rows, batches and autocast)."""
        values = self.old.of(entry.policy_id) if self.old is not None and self.recompute_old else None
        if values is not None and not self.lockstep and self.old.is_current(values):
            return None
        if values is None and not (self.lockstep and self.recompute_old):
            return stored.to(next(self.sampler.model.parameters()).device, torch.float32)
        # under --shard-base every rank runs these passes (an entry of an unknown policy: thrown away)
        with loaded_weights(self.old.params, values) if values is not None else torch.no_grad():
            old = self.predict(entry, text, x_t, steps)
        return old if values is not None else stored.to(old.device, torch.float32)
