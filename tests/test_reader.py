"""Streaming reader: every entry once, equal counts per rank, dataloader workers, filter, re-weighting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from streamalign.buffer.reader import BufferReader
from streamalign.collect.collector import CollectConfig, collect
from streamalign.pipeline import Pipeline
from streamalign.rewards import composite
from streamalign.worlds.shapes import held_in_prompts


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    out = tmp_path_factory.mktemp("buf")
    prompts = tuple(p.text for p in held_in_prompts()[::30])
    cfg = CollectConfig(prompts=prompts, groups=7, group_size=2, entries_per_shard=2, seed=3)
    collect(Pipeline.load("shapes"), cfg, out, progress=False)
    return out


def ids(it) -> list[str]:
    return [e.entry_id for e in it]


def test_single_rank_yields_every_entry_once_shuffled_and_reproducibly(buffer):
    r = BufferReader(buffer, shuffle=4, seed=0)
    a = ids(r)
    assert len(a) == len(r) == 7 and len(set(a)) == 7
    assert a == ids(BufferReader(buffer, shuffle=4, seed=0))
    r.set_epoch(1)
    b = ids(r)
    assert sorted(b) == sorted(a) and b != a


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_disjoint_counts(buffer, world):
    per_rank = [ids(BufferReader(buffer, rank=k, world=world, seed=5)) for k in range(world)]
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == len(BufferReader(buffer, world=world, seed=5))
    flat = [i for x in per_rank for i in x]
    assert len(flat) == len(set(flat))


def test_dataloader_workers_split_shards_and_keep_the_count(buffer):
    r = BufferReader(buffer, rank=0, world=2, seed=1)
    got = ids(DataLoader(r, batch_size=None, num_workers=2))
    assert len(got) == len(r) and len(set(got)) == len(got)
    assert sorted(got) == sorted(ids(BufferReader(buffer, rank=0, world=2, seed=1)))


def test_filter_and_reweighting(buffer):
    where = 'SELECT DISTINCT entry_id FROM manifest WHERE "pivot" >= 2'
    kept = list(BufferReader(buffer, where=where))
    assert 0 < len(kept) < 7 and all(e.pivot >= 2 for e in kept)
    assert len(kept) == len({e.entry_id for e in BufferReader(buffer) if e.pivot >= 2})
    r = BufferReader(buffer, weights={"shape_fidelity": 2.0})
    e = next(iter(r))
    assert e.reward_weights == {"shape_fidelity": 2.0}
    assert torch.allclose(composite(e.rewards, e.reward_weights), 2 * e.rewards["shape_fidelity"])
    with pytest.raises(ValueError, match="unknown rewards"):
        BufferReader(buffer, weights={"hps": 1.0})
    with pytest.raises(ValueError, match="no entries matching the filter"):
        BufferReader(buffer, where="SELECT entry_id FROM manifest WHERE false")
