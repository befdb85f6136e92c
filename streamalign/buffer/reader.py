"""Streaming reader for training: shards split by rank and dataloader worker, a shuffle buffer, equal
counts per rank, an optional manifest filter and read-time reward re-weighting.

Per epoch the shard list is shuffled with ``(seed, epoch)`` and dealt round-robin to ranks; every rank
then yields exactly ``min over ranks`` entries (computed from the manifest, no communication), so DDP
ranks never wait on each other. Within a rank, dataloader workers take every k-th of its shards.

The manifest parts are checked against the buffer's integrity record first
(:mod:`streamalign.buffer.integrity`), and every shard is verified against the checksum that record
gives as it is read (one pass over its bytes); a damaged
shard is an error naming it or, with ``skip_damaged``, skipped and remembered in ``damaged``, its entries
made up for by reading the worker's intact shards again (as ``DistributedSampler`` pads): counts per rank
stay equal and the stream stays a function of the files on disk (exact resume).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info

from ..models.noise import derive_seed
from ..schemas.buffer import Entry, SchemaError
from .formats import DamagedShardError, get_format
from .integrity import checked_manifest
from .urls import location

log = logging.getLogger("streamalign.buffer")


class BufferReader(IterableDataset):
    """Iterate the entries of a buffer folder. ``where``: a read-only SQL query over the view `manifest`
    returning an ``entry_id`` column (e.g. groups whose composite std exceeds 0.05); ``weights``: new reward
    weights applied at read time (``entry.reward_weights`` replaced; stored rewards unchanged);
    ``skip_damaged``: skip shards that fail their checksum instead of raising; ``collection``: read only
    the collection of this shard-name prefix (an on-policy iteration's)."""

    def __init__(
        self,
        folder: str | Path,
        rank: int = 0,
        world: int = 1,
        shuffle: int = 64,
        seed: int = 0,
        where: str | None = None,
        weights: Mapping[str, float] | None = None,
        skip_damaged: bool = False,
        collection: str | None = None,
    ) -> None:
        self.folder = folder  # a path or URL (streamalign.buffer.urls): the manifest and shards lie below it
        self.location = location(folder)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        self.rank, self.world, self.shuffle, self.seed = rank, world, max(1, shuffle), seed
        self.weights = dict(weights) if weights is not None else None
        self.skip_damaged = skip_damaged
        self.damaged: set[str] = set()  # shards found damaged (with skip_damaged)
        checked = checked_manifest(self.folder, collection)
        table = checked.table
        rows = table.select(["entry_id", "shard"]).to_pylist() if table.num_rows else []
        keep = None
        if where is not None:
            from .stats import run_query

            result = run_query(self.folder, where, table=table)
            if "entry_id" not in result.column_names:
                raise ValueError("--filter query must return an entry_id column")
            keep = set(result.column("entry_id").to_pylist())
        self.shards: dict[str, tuple[str, str, set[str]]] = {}  # name -> (format, checksum, entry ids)
        for r in rows:
            if keep is None or r["entry_id"] in keep:
                rec = checked.shards[r["shard"]]  # the record's: the part matched it, so the row names it
                self.shards.setdefault(r["shard"], (rec.format, rec.checksum, set()))[2].add(r["entry_id"])
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
        counts = [sum(len(self.shards[s][2]) for s in mine) for mine in self._deal()]
        return min(counts)

    def __iter__(self) -> Iterator[Entry]:
        mine = self._deal()[self.rank]
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        share = self._shares(mine, nw)[wid]  # the workers' shares add up to the rank's quota exactly
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, wid))
        pool: list[Entry] = []
        produced = 0
        names, lap = mine[wid::nw], 0
        while True:
            for name in names:
                for entry in self._read(name):
                    pool.append(self._reweight(entry))
                    if len(pool) >= self.shuffle:
                        if produced >= share:
                            return
                        yield pool.pop(rng.randrange(len(pool)))
                        produced += 1
                if lap and produced + len(pool) >= share:
                    break  # a make-up lap ends as soon as the share is reached
            if produced + len(pool) >= share or not self.damaged & set(mine[wid::nw]):
                break
            names, lap = [n for n in mine[wid::nw] if n not in self.damaged], lap + 1
            if not names:
                raise DamagedShardError(f"rank {self.rank} worker {wid}: every one of its shards is damaged "
                                        f"({', '.join(mine[wid::nw])}): restore or re-collect them")  # fmt: skip
        while pool and produced < share:
            yield pool.pop(rng.randrange(len(pool)))
            produced += 1
        if produced < share:
            raise SchemaError(f"rank {self.rank} worker {wid}: shards hold fewer entries than the manifest lists")

    def _read(self, name: str) -> Iterator[Entry]:
        """The wanted entries of one shard, verified against its recorded checksum before the first one;
        none for a damaged shard under skip_damaged."""
        fmt, digest, wanted = self.shards[name]
        if name in self.damaged:
            return
        entries = get_format(fmt).read(self.location.shard(name), digest)
        try:
            first = next(entries, None)
        except DamagedShardError as e:
            if not self.skip_damaged:
                raise DamagedShardError(f"damaged shard {e}: restore or re-collect it, or pass --skip-damaged "
                                        "to train without it") from None  # fmt: skip
            log.warning("skipping damaged shard %s", e)
            self.damaged.add(name)
            return
        for entry in itertools.chain([first] if first is not None else [], entries):
            if entry.entry_id in wanted:
                yield entry

    def _shares(self, mine: list[str], nw: int) -> list[int]:
        """Split this rank's quota over `nw` workers in proportion to the entries of their shards."""
        avail = [sum(len(self.shards[s][2]) for s in mine[w::nw]) for w in range(nw)]
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
