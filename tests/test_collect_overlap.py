"""Scoring cost in collect: a group's G branches scored as one batch, a plug-in loaded once per process, and
`--background-scoring` (group i scored in a worker thread while group i+1 rolls out): the same shard and
manifest bytes, at most one group waiting, a reward's error surfacing as without it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from streamalign.buffer.inspect import buffer_info
from streamalign.cli import app
from streamalign.collect import collector
from streamalign.collect.collector import CollectConfig, collect
from streamalign.io.files import checksum
from streamalign.pipeline import Pipeline
from streamalign.rewards.sources import _LOADED
from streamalign.worlds.shapes import held_in_prompts

PROMPTS = tuple(p.text for p in held_in_prompts()[::40])
ARGS = ["--groups", "5", "-G", "3", "--entries-per-shard", "2", "--seed", "3"]

# a plug-in that records every call (thread, batch size) and fails on its `fail_at`-th call (0: never)
PLUGIN = """
import threading
import torch

LOADS, CALLS = [], []

def make(fail_at=0, error="value"):
    LOADS.append(fail_at)
    def score(videos, prompts):
        CALLS.append((threading.current_thread().name, videos.shape[0]))
        if len(CALLS) == fail_at:
            raise (ValueError if error == "value" else RuntimeError)(f"plug-in failed on call {fail_at}")
        return videos.float().mean(dim=(1, 2, 3, 4))
    return score
"""


@pytest.fixture
def plugin(tmp_path) -> Path:
    file = tmp_path / "probe.py"
    file.write_text(PLUGIN)
    _LOADED.clear()  # every test loads its own copy
    return file


@pytest.fixture(scope="module")
def policy():
    return Pipeline.load("shapes")


def _module(plugin: Path):
    from streamalign.rewards.external import import_factory

    return import_factory(f"{plugin}:make").__globals__


def folder_bytes(folder: Path) -> dict[str, str]:
    """Checksum of every shard and manifest part (the record and run.yaml name their folder)."""
    parts = [*folder.glob("shard-*"), *folder.glob("manifest/*.parquet")]
    return {str(p.relative_to(folder)): checksum(p) for p in sorted(parts)}


def test_background_scoring_writes_the_same_bytes(tmp_path, plugin):
    # nan_on_red rejects some groups: rejections keep their place too
    nan = Path(__file__).resolve().parent / "nan_reward.py"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")  # groups 0 and 3 are red
    common = [*ARGS, "--prompts", str(prompts), "--rewards", "probe=1,nan_on_red=1,colour_match=1", "--metrics", "",
              "--reward-plugin", f"probe={plugin}:make,nan_on_red={nan}:make"]  # fmt: skip
    runs = {}
    for name, extra in (("sync", []), ("background", ["--background-scoring"])):
        r = CliRunner().invoke(app, ["-q", "collect", *common, *extra, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        runs[name] = folder_bytes(tmp_path / name)
    assert runs["sync"] == runs["background"] and len(runs["sync"]) == 6  # 3 shards + 3 manifest parts
    assert buffer_info(tmp_path / "background")["rejected_groups"] == 2
    calls = _module(plugin)["CALLS"]
    assert [n for n, _ in calls[:5]] == ["MainThread"] * 5  # the synchronous run
    assert all(n.startswith("streamalign-scoring") for n, _ in calls[5:]) and len(calls) == 10


def test_branches_scored_in_one_batch_and_the_plugin_loads_once(tmp_path, plugin, policy):
    cfg = CollectConfig(prompts=PROMPTS, groups=3, group_size=4, entries_per_shard=2, rewards="probe=1",
                        metrics="", reward_plugins=f"probe={plugin}:make")  # fmt: skip
    collect(policy, cfg, tmp_path / "a", progress=False)
    collect(policy, cfg.model_copy(update={"groups": 5}), tmp_path / "a", progress=False)  # extended
    mod = _module(plugin)
    assert mod["LOADS"] == [0]  # one load for the process, however many collections
    assert [b for _, b in mod["CALLS"]] == [4] * 5  # one call per group, its G=4 branches together


def test_at_most_one_group_waits_for_its_scores(tmp_path, policy, monkeypatch):
    rolled, scored, most = [], [], [0]
    lock = threading.Lock()
    roll, score = collector.roll_out_group, collector.score_group

    def rolling(*a, **k):
        out = roll(*a, **k)
        with lock:
            rolled.append(out.i)
            most[0] = max(most[0], len(rolled) - len(scored))
        return out

    def scoring(r, reward):
        out = score(r, reward)
        with lock:
            scored.append(r.i)
        return out

    monkeypatch.setattr(collector, "roll_out_group", rolling)
    monkeypatch.setattr(collector, "score_group", scoring)
    cfg = CollectConfig(prompts=PROMPTS, groups=6, group_size=2, entries_per_shard=4, background_scoring=True)
    s = collect(policy, cfg, tmp_path, progress=False)
    assert s.groups == 6 and rolled == scored == list(range(6))
    assert most[0] <= 2  # one group being scored while the next one rolls out, never more


@pytest.mark.parametrize("error", ["value", "runtime"])
def test_a_failing_reward_surfaces_as_without_background_scoring(tmp_path, plugin, policy, error):
    cfg = CollectConfig(prompts=PROMPTS, groups=5, group_size=2, entries_per_shard=2, rewards="probe=1",
                        metrics="", reward_plugins=f"probe={plugin}:make", reward_options=f"probe.fail_at=4,"
                        f"probe.error={error}")  # fmt: skip
    got = {}
    for name, background in (("sync", False), ("background", True)):
        _LOADED.clear()
        _module(plugin)["CALLS"].clear()
        with pytest.raises(ValueError if error == "value" else RuntimeError) as e:
            collect(policy, cfg.model_copy(update={"background_scoring": background}), tmp_path / name,
                    progress=False)  # fmt: skip
        got[name] = (type(e.value), str(e.value), sorted(p.name for p in (tmp_path / name).glob("shard-*")))
        assert not list((tmp_path / name).rglob(".*tmp-*"))  # nothing half-written
    assert got["sync"] == got["background"]
    assert got["sync"][1:] == ("plug-in failed on call 4", ["shard-000000.tar"])  # the first shard was finished


def test_cli_error_is_one_line(tmp_path, plugin):
    r = CliRunner().invoke(app, ["-q", "collect", *ARGS, "--rewards", "probe=1", "--metrics", "",
                                 "--reward-plugin", f"probe={plugin}:make", "--reward-option", "probe.fail_at=2",
                                 "--background-scoring", "--out", str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 2 and "plug-in failed on call 2" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not list((tmp_path / "x").glob("shard-*"))
