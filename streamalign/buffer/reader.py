"""Streaming reader for training: shards split by rank and dataloader worker, a shuffle buffer, equal
counts per rank, an optional manifest filter and read-time reward re-weighting.

Per epoch the shard list is shuffled with ``(seed, epoch)`` and dealt round-robin to ranks; every rank
then yields exactly ``min over ranks`` entries (computed from the manifest, no communication), so DDP
ranks never wait on each other. Within a rank, dataloader workers take every k-th of its shards.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from ..models.noise import derive_seed
from ..schemas.buffer import Entry, SchemaError
from .formats import get_format
from .manifest import read_manifest


class BufferReader(IterableDataset):
    """Iterate the entries of a buffer folder. ``where``: a read-only SQL query over the view `manifest`
    returning an ``entry_id`` column (e.g. groups whose composite std exceeds 0.05); ``weights``: new reward
    weights applied at read time (``entry.reward_weights`` replaced; stored rewards unchanged)."""

    def __init__(
        self,
        folder: str | Path,
        rank: int = 0,
        world: int = 1,
        shuffle: int = 64,
        seed: int = 0,
        where: str | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        self.folder = Path(folder)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.rank, self.world, self.shuffle, self.seed = rank, world, max(1, shuffle), seed
        self.weights = dict(weights) if weights is not None else None
        table = read_manifest(self.folder)
        rows = table.select(["entry_id", "shard", "format"]).to_pylist()
        keep = None
        if where is not None:
            from .stats import run_query

            result = run_query(self.folder, where)
            if "entry_id" not in result.column_names:
                raise ValueError("--filter query must return an entry_id column")
            keep = set(result.column("entry_id").to_pylist())
        self.shards: dict[str, tuple[str, set[str]]] = {}
        for r in rows:
            if keep is None or r["entry_id"] in keep:
                self.shards.setdefault(r["shard"], (r["format"], set()))[1].add(r["entry_id"])
        if not self.shards:
            raise ValueError(f"buffer {self.folder} has no entries" + (" matching the filter" if where else ""))
        rewards = {c.removeprefix("reward_") for c in table.column_names if c.startswith("reward_")}
        if self.weights is not None and not set(self.weights) <= rewards:
            raise ValueError(
                f"re-weighting names unknown rewards {sorted(set(self.weights) - rewards)}; have {sorted(rewards)}"
            )
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _deal(self) -> list[list[str]]:
        names = sorted(self.shards)
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(names)
        return [names[r :: self.world] for r in range(self.world)]

    def __len__(self) -> int:
        """Entries this rank yields per epoch (the same on every rank)."""
        counts = [sum(len(self.shards[s][1]) for s in mine) for mine in self._deal()]
        return min(counts)

    def __iter__(self) -> Iterator[Entry]:
        mine = self._deal()[self.rank]
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self._shares(mine, nw)[wid]  # the workers' shares add up to the rank's quota exactly
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, wid))
        pool: list[Entry] = []
        produced = 0
        for name in mine[wid::nw]:
            fmt, wanted = self.shards[name]
            for entry in get_format(fmt).read(self.folder / name):
                if entry.entry_id not in wanted:
                    continue
                pool.append(self._reweight(entry))
                if len(pool) >= self.shuffle:
                    if produced >= share:
                        return
                    yield pool.pop(rng.randrange(len(pool)))
                    produced += 1
        while pool and produced < share:
            yield pool.pop(rng.randrange(len(pool)))
            produced += 1
        if produced < share:
            raise SchemaError(f"rank {self.rank} worker {wid}: shards hold fewer entries than the manifest lists")

    def _shares(self, mine: list[str], nw: int) -> list[int]:
        """Split this rank's quota over `nw` workers in proportion to the entries of their shards."""
        avail = [sum(len(self.shards[s][1]) for s in mine[w::nw]) for w in range(nw)]
        quota, total = len(self), sum(avail)
        shares = [quota * a // total for a in avail]
        for w in sorted(range(nw), key=lambda w: -avail[w]):
            if sum(shares) == quota:
                break
            if shares[w] < avail[w]:
                shares[w] += 1
        return shares

    def _reweight(self, entry: Entry) -> Entry:
        if self.weights is None:
            return entry
        entry.reward_weights = dict(self.weights)
        return entry
