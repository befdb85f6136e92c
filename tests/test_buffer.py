"""Buffer entries and shard formats: one parametrised suite for webdataset and zarr."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamalign.buffer.formats import FORMATS, get_format, write_shard
from streamalign.buffer.manifest import read_manifest, write_manifest_part
from streamalign.buffer.verify import seal_buffer
from streamalign.io.files import checksum
from streamalign.schemas.buffer import LATENT_FIELDS, Entry, SchemaError


def make_entry(group, i: int = 0, dtype: torch.dtype = torch.float32, kv: bool = False) -> Entry:
    g = group.group_size
    rewards = {"colour_match": torch.linspace(0, 1, g), "sharpness": torch.full((g,), 0.25 + i)}
    entry = Entry.from_fork_group(
        group,
        entry_id=f"run0-{i:04d}",
        run_id="run0",
        policy_id="base",
        prompt="a red circle moving left on a gray background",
        prompt_id="p0",
        config_name="tiny",
        arch_id="abc",
        timesteps=[1000.0, 937.5, 833.3333, 625.0],
        rewards=rewards,
        reward_weights={"colour_match": 1.0, "sharpness": 0.5},
        kv={"k.0": torch.randn(6, 2, 4).to(dtype), "v.0": torch.randn(6, 2, 4).to(dtype)} if kv else {},
    )
    return dataclasses.replace(entry, **{name: getattr(entry, name).to(dtype) for name in LATENT_FIELDS})


@pytest.fixture(scope="module")
def groups():
    from streamalign.models.sampler import Sampler
    from tests.conftest import make_model, tiny_config

    cfg = tiny_config()
    sampler = Sampler(make_model(cfg), cfg)
    text = torch.randn(1, 5, cfg.arch.text_dim, generator=torch.Generator().manual_seed(0))
    return [sampler.fork_group(text, sampler.noise_bank(s), pivot=p, group_size=3) for s, p in ((1, 0), (2, 2))]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Entry, b: Entry) -> None:
    """Every field equal; tensors bit-exact with the same dtype."""
    for f in dataclasses.fields(Entry):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y)), f.name
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), torch.Tensor):
            assert x.keys() == y.keys() and all(
                x[k].dtype == y[k].dtype and torch.equal(bits(x[k]), bits(y[k])) for k in x
            )
        else:
            assert x == y, f.name


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, groups, fmt, dtype):
    entries = [make_entry(g, i, dtype, kv=i == 1) for i, g in enumerate(groups)]
    info = write_shard(get_format(fmt), tmp_path / f"shard-000000{FORMATS[fmt].suffix}", entries)
    assert info.entries == 2 and info.bytes > 0 and info.checksum == checksum(info.path)
    back = list(get_format(fmt).read(info.path))
    assert len(back) == 2
    for a, b in zip(entries, back, strict=True):
        assert_same(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == [info.path.name]  # no temporary left behind
    again = write_shard(get_format(fmt), tmp_path / f"again{FORMATS[fmt].suffix}", entries)
    assert again.checksum == info.checksum  # same entries, same bytes


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_invalid_entries_are_refused_and_leave_nothing(tmp_path, groups, fmt):
    good = make_entry(groups[1])
    bad_shape = dataclasses.replace(good, x_t=good.x_t[:, :2])
    nan = dataclasses.replace(good, rewards={**good.rewards, "sharpness": torch.tensor([0.1, float("nan"), 0.2])})
    bad_id = dataclasses.replace(good, entry_id="a.b")
    for bad, msg in ((bad_shape, "x_t has shape"), (nan, "NaN"), (bad_id, "entry id")):
        with pytest.raises(SchemaError, match=msg):
            write_shard(get_format(fmt), tmp_path / f"s{FORMATS[fmt].suffix}", [good, bad])
        assert list(tmp_path.iterdir()) == []
    path = tmp_path / f"s{FORMATS[fmt].suffix}"
    write_shard(get_format(fmt), path, [good])
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_shard(get_format(fmt), path, [good])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_damage_is_detected(tmp_path, groups, fmt):
    info = write_shard(
        get_format(fmt), tmp_path / f"s{FORMATS[fmt].suffix}", [make_entry(g, i) for i, g in enumerate(groups)]
    )
    target = (
        info.path
        if info.path.is_file()
        else max((p for p in info.path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    )
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert checksum(info.path) != info.checksum
    if info.path.is_file():  # a truncated tar cannot be read
        target.write_bytes(bytes(data[: len(data) // 3]))
        with pytest.raises(SchemaError, match=r"damaged|incomplete"):
            list(get_format(fmt).read(info.path))


def test_schema_validation_names_the_problem(groups):
    e = make_entry(groups[0])
    with pytest.raises(SchemaError, match="pivot 5 is outside"):
        dataclasses.replace(e, pivot=5).validate()
    with pytest.raises(SchemaError, match="schema version 99"):
        dataclasses.replace(e, schema_version=99).validate()
    with pytest.raises(SchemaError, match="float32/bfloat16/float16"):
        dataclasses.replace(e, context=e.context.long()).validate()
    meta, tensors = e.to_record()
    with pytest.raises(SchemaError, match="not a streamalign buffer entry"):
        Entry.from_record(meta, {k: v for k, v in tensors.items() if k != "x_t"})
    assert set(LATENT_FIELDS) <= set(tensors)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_manifest_has_one_row_per_branch(tmp_path, groups, fmt):
    entries = [make_entry(g, i) for i, g in enumerate(groups)]
    info = write_shard(get_format(fmt), tmp_path / f"shard-000000{FORMATS[fmt].suffix}", entries)
    write_manifest_part(tmp_path, entries, info)
    seal_buffer(tmp_path)  # a part written by hand is in no integrity record until sealed
    table = read_manifest(tmp_path).to_pylist()
    assert len(table) == 6 and {r["branch"] for r in table} == {0, 1, 2}
    r = table[4]
    assert r["entry_id"] == "run0-0001" and r["pivot"] == 2 and r["shard"] == info.path.name
    assert r["checksum"] == info.checksum and r["format"] == fmt
    assert r["composite"] == pytest.approx(r["reward_colour_match"] + 0.5 * r["reward_sharpness"])
