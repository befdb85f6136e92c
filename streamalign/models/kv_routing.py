"""KV routing (KVPO's exploration): branches that differ in which cached frames they attend to.

A rolling cache keeps `sink` frames forever and a ring of ``window + history`` recent frames; a chunk
normally attends to the sink plus the last `window` frames (its own included). A routed group picks a
start chunk p and perturbs ``blocks`` consecutive chunks p .. p+P-1: in them branch k attends to the
sink, the ``m_nearest`` newest frames (its own chunk included) and ``window - m_nearest`` older frames
chosen at random from those still resident for the whole perturbation (the same frames in every
perturbed chunk). Every other chunk, and the anchor, attends as usual. Facts from
Richard-Zhang-AI/KVPO@7703196 ``models/longlive/pipeline/diversity_sampling.py``: the eligibility rule
(window full, pool large enough, ``perturb_within_first_x_chunks``), the pool ``[max(sink, last_start +
c - ring), start - m_nearest)`` and the dispersed selection (one seeded permutation of the pool, branch k
reads ``n`` consecutive entries of it from ``k * max(1, pool // K)``, cyclically).

Everything here is a pure function of its arguments and the group's seed (no global random state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import derive_seed

# address tags under the group's seed (the noise bank's addresses have three parts, these two)
_START_TAG, _PERMUTATION_TAG = (7, 0), (7, 1)


@dataclass(frozen=True)
class RoutingGeometry:
    """The cache and perturbation sizes a routing is planned for (all in latent frames but the chunk
    counts): `sink` and `window` as the rolling cache (cache.sink / cache.window), `history` extra ring
    slots that keep older frames resident, `m_nearest` newest frames kept, `blocks` perturbed chunks,
    `first_chunks`: the start chunk lies among chunks 0 .. first_chunks-1."""

    num_chunks: int
    chunk_frames: int
    sink: int
    window: int
    history: int
    m_nearest: int = 4
    blocks: int = 5
    first_chunks: int = 7

    def check(self) -> None:
        c = self.chunk_frames
        if not c <= self.m_nearest <= self.window:
            raise ValueError(
                f"--m-nearest {self.m_nearest} must lie in {c}..{self.window} (the chunk's own {c} frames up to "
                "the window): a chunk always attends to itself"
            )
        if self.blocks < 1 or self.first_chunks < 1 or self.history < 0:
            raise ValueError("--perturb-blocks and --perturb-first must be >= 1, --kv-history >= 0")

    @property
    def ring(self) -> int:
        """Ring slots of the cache a routed rollout needs (beyond the sink)."""
        return self.window + self.history

    @property
    def random_frames(self) -> int:
        """Older frames each branch attends to in a perturbed chunk: the window budget beyond the nearest."""
        return self.window - self.m_nearest


@dataclass(frozen=True)
class Eligible:
    """A start chunk and the pool of older frames ``[pool_start, pool_end)`` its branches draw from."""

    chunk: int
    pool_start: int
    pool_end: int


def eligible_starts(geo: RoutingGeometry) -> list[Eligible]:
    """Start chunks p (ascending) whose whole perturbation fits: the window is full at p (``p*c >= sink +
    window``), the P chunks end inside the video, and the pool of older frames resident until the last
    perturbed chunk is written holds at least ``window - m_nearest`` frames."""
    geo.check()
    c, out = geo.chunk_frames, []
    for p in range(min(geo.first_chunks, geo.num_chunks)):
        f = p * c
        if f < geo.sink + geo.window or p + geo.blocks > geo.num_chunks:
            continue
        last = f + (geo.blocks - 1) * c
        pool_start = max(geo.sink, last + c - geo.ring)  # older frames are evicted from the ring after this
        pool_end = f - geo.m_nearest
        if pool_end - pool_start >= geo.random_frames:
            out.append(Eligible(p, pool_start, pool_end))
    return out


@dataclass(frozen=True)
class RoutingPlan:
    """A routed group: chunks ``start .. start+blocks-1`` perturbed; `older[k]` the sorted absolute older
    frames branch k attends to there (K = len(older) branches; the anchor is not in it)."""

    start: int
    blocks: int
    m_nearest: int
    sink: int
    chunk_frames: int
    older: tuple[tuple[int, ...], ...]

    def attended(self, branch: int, chunk: int) -> list[int] | None:
        """Absolute frames branch k's chunk attends to (ascending), None where it attends as usual."""
        if not self.start <= chunk < self.start + self.blocks:
            return None
        end = (chunk + 1) * self.chunk_frames
        nearest = range(end - self.m_nearest, end)
        return sorted({*range(self.sink), *self.older[branch], *nearest})

    def routes(self, branch: int) -> dict[int, list[int]]:
        """{first frame of a perturbed chunk: the frames it attends to} for branch k (a cache's ``routes``)."""
        c = self.chunk_frames
        return {j * c: self.attended(branch, j) for j in range(self.start, self.start + self.blocks)}

    def to_json(self) -> dict:
        return {"start": self.start, "blocks": self.blocks, "m_nearest": self.m_nearest, "sink": self.sink,
                "chunk_frames": self.chunk_frames, "older": [list(o) for o in self.older]}  # fmt: skip

    @classmethod
    def from_json(cls, d: dict) -> RoutingPlan:
        older = tuple(tuple(int(f) for f in o) for o in d["older"])
        return cls(int(d["start"]), int(d["blocks"]), int(d["m_nearest"]), int(d["sink"]), int(d["chunk_frames"]),
                   older)  # fmt: skip


def plan_routing(geo: RoutingGeometry, branches: int, seed: int, start: int | None = None) -> RoutingPlan:
    """The routing of a group of `branches` branches from its noise seed: the start chunk drawn uniformly
    among :func:`eligible_starts` (or the given `start`, which must be eligible), then each branch's older
    frames by the dispersed selection (module docstring)."""
    if branches < 1:
        raise ValueError(f"a routed group needs >= 1 branch, got {branches}")
    eligible = eligible_starts(geo)
    if not eligible:
        raise ValueError(
            f"no chunk can start a KV-routing perturbation of {geo.blocks} chunks: needs a start in chunks "
            f"0..{geo.first_chunks - 1} at frame >= sink + window ({geo.sink + geo.window}) with "
            f"{geo.random_frames} older frames resident (lower --perturb-blocks, raise --kv-history or --perturb-first)"
        )
    if start is None:
        g = torch.Generator().manual_seed(derive_seed(seed, *_START_TAG))
        pick = eligible[int(torch.randint(len(eligible), (1,), generator=g))]
    else:
        found = [e for e in eligible if e.chunk == start]
        if not found:
            raise ValueError(f"--pivot {start} cannot start a KV-routing perturbation; eligible chunks: "
                             f"{[e.chunk for e in eligible]}")  # fmt: skip
        pick = found[0]
    pool = list(range(pick.pool_start, pick.pool_end))
    n = min(geo.random_frames, len(pool))
    older: list[tuple[int, ...]] = []
    if n == 0:
        older = [()] * branches
    else:
        g = torch.Generator().manual_seed(derive_seed(seed, *_PERMUTATION_TAG))
        perm = torch.randperm(len(pool), generator=g).tolist()
        shift = max(1, len(pool) // branches)
        for k in range(branches):
            older.append(tuple(sorted(pool[perm[(k * shift + i) % len(pool)]] for i in range(n))))
    return RoutingPlan(pick.chunk, geo.blocks, geo.m_nearest, geo.sink, geo.chunk_frames, tuple(older))
