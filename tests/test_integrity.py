"""Nothing lost, nothing silent: damaged shards refused (or skipped and counted), zarr chunks never read as
zeros, non-finite values stop training with the last good checkpoint kept, run identity on resume, damaged
checkpoints fall back, collections record their settings, a lock keeps out a second writer, and `verify`
tells an interrupted collection. Tiny settings on the shipped shapes model."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from streamalign.buffer.collection import LOCK, BufferLock, Collection, collections, record_path
from streamalign.buffer.formats import DamagedShardError, get_format
from streamalign.buffer.inspect import verify_buffer
from streamalign.buffer.integrity import SEAL
from streamalign.buffer.manifest import MANIFEST_DIR, read_manifest
from streamalign.buffer.reader import BufferReader
from streamalign.cli import app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.io.files import checksum, remove_stale_tree
from streamalign.io.outputs import MARKER, marker_text
from streamalign.pipeline import Pipeline
from streamalign.rewards.registry import get_spec, register
from streamalign.train import loop
from streamalign.train.config import TrainConfig
from streamalign.train.loop import NonFiniteError, train
from streamalign.train.state import CHECKPOINTS, checkpoints
from streamalign.worlds.shapes import held_in_prompts

PROMPTS = tuple(p.text for p in held_in_prompts()[::40])


@pytest.fixture(scope="module")
def policy():
    return Pipeline.load("shapes")


@pytest.fixture(scope="module")
def tar_buffer(tmp_path_factory, policy) -> Path:
    """4 groups of 2 branches, one per shard."""
    out = tmp_path_factory.mktemp("tar") / "buf"
    collect(policy, CollectConfig(prompts=PROMPTS, groups=4, group_size=2, entries_per_shard=1), out, progress=False)
    return out


@pytest.fixture(scope="module")
def zarr_buffer(tmp_path_factory, policy) -> Path:
    out = tmp_path_factory.mktemp("zarr") / "buf"
    cfg = CollectConfig(prompts=PROMPTS, groups=2, group_size=2, entries_per_shard=1, format="zarr")
    collect(policy, cfg, out, progress=False)
    return out


def copy(src: Path, tmp_path: Path, name: str = "buf") -> Path:
    shutil.copytree(src, tmp_path / name)
    return tmp_path / name


def flip(path: Path, n: int = 8) -> None:
    """Flip `n` bytes in the middle of a file (inside the tensor payload)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def biggest_chunk(shard: Path) -> Path:
    return max((p for p in shard.rglob("*") if p.is_file() and p.name != "zarr.json"), key=lambda p: p.stat().st_size)


TRAIN = ["--steps", "2", "--batch-groups", "2", "--lr", "1e-4", "--lora-rank", "4", "--lora-alpha", "8",
         "--threads", "1", "--save-every", "1"]  # fmt: skip


def cli(monkeypatch, *args: str):
    """Run the CLI quietly in-process: (exit code, non-empty output lines)."""
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what -q sets; restored after the test
    r = CliRunner().invoke(app, ["-q", *args])
    return r.exit_code, [line for line in r.output.splitlines() if line.strip()]


def _cfg(buffer: Path, **kw) -> TrainConfig:
    args = dict(buffer=str(buffer), steps=4, batch_groups=2, lr=1e-4, lora_rank=4, lora_alpha=8, save_every=2,
                threads=1)  # fmt: skip
    return TrainConfig(**{**args, **kw})


# ---------------------------------------------------------------------------------------------------
# damaged data
# ---------------------------------------------------------------------------------------------------
def test_train_refuses_a_damaged_tar_shard_and_skip_damaged_counts_it(tmp_path, monkeypatch, caplog, tar_buffer):
    buf = copy(tar_buffer, tmp_path)
    flip(buf / "shard-000001.tar")
    code, lines = cli(monkeypatch, "train", "--out", str(tmp_path / "run"), "--buffer", str(buf), *TRAIN)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: damaged shard {buf / 'shard-000001.tar'}: checksum")
    assert "--skip-damaged" in lines[0]
    assert not (tmp_path / "run" / "adapter").exists()
    with caplog.at_level(logging.WARNING, logger="streamalign.buffer"):
        code, lines = cli(monkeypatch, "train", "--out", str(tmp_path / "skip"), "--buffer", str(buf), *TRAIN,
                          "--skip-damaged")  # fmt: skip
    assert code == 0, lines
    warned = [r.message for r in caplog.records if r.message.startswith("skipping damaged shard")]
    assert len(warned) == 1 and "shard-000001.tar" in warned[0]  # once, not once per epoch
    assert "1 damaged shard(s) skipped" in lines[-1]
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["damaged_shards"] == ["shard-000001.tar"]


def test_skipped_damage_keeps_equal_counts_per_rank_and_a_fixed_stream(tmp_path, tar_buffer):
    buf = copy(tar_buffer, tmp_path)
    flip(buf / "shard-000002.tar")
    damaged_ids = {r["entry_id"] for r in read_manifest(buf).to_pylist() if r["shard"] == "shard-000002.tar"}
    for rank in (0, 1):
        reader = BufferReader(buf, rank, 2, seed=3, skip_damaged=True)
        first, again = [e.entry_id for e in reader], [e.entry_id for e in reader]
        assert len(first) == len(reader) == 2 and first == again  # padded from intact shards, same order
        assert not damaged_ids & set(first)
    assert reader.damaged <= {"shard-000002.tar"}
    with pytest.raises(DamagedShardError, match=r"shard-000002\.tar"):
        for rank in (0, 1):
            list(BufferReader(buf, rank, 2, seed=3))


def test_train_refuses_a_zarr_chunk_with_flipped_bytes(tmp_path, monkeypatch, zarr_buffer):
    buf = copy(zarr_buffer, tmp_path)
    flip(biggest_chunk(buf / "shard-000000.zarr"))
    code, lines = cli(monkeypatch, "train", "--out", str(tmp_path / "run"), "--buffer", str(buf), *TRAIN)
    assert code == 2 and len(lines) == 1 and "damaged shard" in lines[0] and "shard-000000.zarr" in lines[0], lines
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_deleted_zarr_chunk_is_an_error_never_zeros(tmp_path, zarr_buffer):
    buf = copy(zarr_buffer, tmp_path)
    shard = buf / "shard-000001.zarr"
    chunk = next(p for p in shard.rglob("*") if p.is_file() and "/x_t/c/" in p.as_posix())
    chunk.unlink()
    with pytest.raises(DamagedShardError, match=r"x_t/c/0.*is missing"):  # read without the manifest
        list(get_format("zarr").read(shard))
    with pytest.raises(DamagedShardError, match=r"shard-000001\.zarr: checksum"):  # the training reader
        list(BufferReader(buf))
    assert not verify_buffer(buf).ok


@pytest.mark.parametrize("kind", ["loss", "reward", "gradient"])
def test_non_finite_values_stop_training_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, tar_buffer, kind):
    """The 5th entry of the stream (update 3 of batch 2) carries a NaN loss, reward or gradient."""
    entries = loop._entries
    poisoned = {}

    def with_poison(reader, epoch, skip):
        for n, (e, ep, i) in enumerate(entries(reader, epoch, skip)):
            if n == 4:
                poisoned["id"] = e.entry_id
                if kind == "reward":
                    e.rewards = {**e.rewards, "colour_match": torch.full_like(e.rewards["colour_match"], float("nan"))}
                else:
                    e.prompt = "POISON " + e.prompt  # the objective below spots it
            yield e, ep, i

    objective_cls = type(_cfg(tar_buffer).objective.build())
    group_loss = objective_cls.group_loss

    def poisoned_loss(self, group, policy):
        out = group_loss(self, group, policy)
        if group.entry.prompt.startswith("POISON "):
            if kind == "loss":
                out.loss = out.loss * float("nan")
            else:  # finite value, NaN gradient: d sqrt(x)/dx at 0 times 0
                p = next(q for q in policy.sampler.model.parameters() if q.requires_grad)
                out.loss = out.loss + 0.0 * torch.sqrt(p.sum() - p.sum().detach())
        return out

    monkeypatch.setattr(loop, "_entries", with_poison)
    monkeypatch.setattr(objective_cls, "group_loss", poisoned_loss)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=rf"update 3: non-finite {kind}.* entry {poisoned.get('id', '')}") as err:
        train(_cfg(tar_buffer, steps=3), out, progress=False)
    assert poisoned["id"] in str(err.value) and "\n" not in str(err.value)
    assert [c.name for c in checkpoints(out)] == ["step-0000002"]
    weights = load_file(str(out / CHECKPOINTS / "step-0000002" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()  # no NaN final adapter


# ---------------------------------------------------------------------------------------------------
# run identity and checkpoints
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run4(tmp_path_factory, tar_buffer) -> Path:
    """A finished 4-update run with checkpoints at updates 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "run4"
    train(_cfg(tar_buffer), out, progress=False)
    return out


def test_a_fresh_run_into_a_used_out_is_refused_unless_overwrite(tmp_path, monkeypatch, tar_buffer, run4):
    out = copy(run4, tmp_path, "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, lines = cli(monkeypatch, "train", "--out", str(out), "--buffer", str(tar_buffer), *TRAIN)
    assert code == 2 and len(lines) == 1, lines
    assert "holds an earlier training run's checkpoints (newest step-0000004)" in lines[0] and "--resume" in lines[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    train(_cfg(tar_buffer, steps=1, save_every=1), out, progress=False, overwrite=True)
    assert [c.name for c in checkpoints(out)] == ["step-0000001"]  # the old run's are gone, not mixed in


def test_resume_names_every_changed_setting(tmp_path, tar_buffer, run4):
    out = copy(run4, tmp_path, "run")
    with pytest.raises(ValueError) as err:
        train(_cfg(tar_buffer, lr=2e-4, lora_alpha=16, steps=6), out, resume=True, progress=False)
    msg = str(err.value)
    assert "lora.lora_alpha (run.yaml 8.0, now 16.0)" in msg and "optim.lr (run.yaml 0.0001, now 0.0002)" in msg
    assert "schedule.steps" not in msg and "\n" not in msg


def test_resume_needs_run_yaml_and_a_checkpoint(tmp_path, tar_buffer, run4):
    out = copy(run4, tmp_path, "run")
    (out / "run.yaml").unlink()
    with pytest.raises(ValueError, match=r"run.yaml is missing, so the checkpoints .* cannot be matched"):
        train(_cfg(tar_buffer), out, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"--resume: .*empty holds no checkpoint to continue from"):
        train(_cfg(tar_buffer), tmp_path / "empty", resume=True, progress=False)
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("damaged", ["adapter/adapter_model.safetensors", "optimizer.pt", "progress.json"])
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, tar_buffer, run4, damaged):
    out = copy(run4, tmp_path, "run")
    f = out / CHECKPOINTS / "step-0000004" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    shutil.rmtree(out / "adapter")
    with caplog.at_level(logging.WARNING, logger="streamalign.train"):
        s = train(_cfg(tar_buffer), out, resume=True, progress=False)
    assert s.steps == 4
    assert any("step-0000004 is damaged" in r.message and damaged in r.message for r in caplog.records)
    adapter = "adapter/adapter_model.safetensors"
    assert (out / adapter).read_bytes() == (run4 / adapter).read_bytes()  # redone from update 2: same bytes
    assert [c.name for c in checkpoints(out)] == ["step-0000002", "step-0000004"]


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path, tar_buffer, run4):
    out = copy(run4, tmp_path, "run")
    for c in checkpoints(out):
        (c / "progress.json").write_text("{")
    with pytest.raises(ValueError, match=r"no intact checkpoint .*progress.json"):
        train(_cfg(tar_buffer), out, resume=True, progress=False)


def test_pruning_keeps_the_new_checkpoint_and_never_a_newer_one(tmp_path):
    from streamalign.adapters.lora import LoraSettings, attach_lora
    from streamalign.train.state import Progress, save_checkpoint

    from .conftest import make_model, tiny_config

    peft = attach_lora(make_model(tiny_config()), LoraSettings(2, 4))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad])
    for step in (1, 2, 3, 9):
        (tmp_path / CHECKPOINTS / f"step-{step:07d}").mkdir(parents=True)
    new = save_checkpoint(tmp_path, peft, opt, Progress(step=4))
    assert [c.name for c in checkpoints(tmp_path)] == ["step-0000003", "step-0000004", "step-0000009"]
    assert json.loads((new / "checksums.json").read_text())["optimizer.pt"] == checksum(new / "optimizer.pt")


# ---------------------------------------------------------------------------------------------------
# collections: recorded settings, extension, the writer lock, verify
# ---------------------------------------------------------------------------------------------------
def test_collect_rerun_with_other_settings_is_refused_naming_them(tmp_path, monkeypatch, policy):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "buf"
    base = ["collect", "--out", str(out), "--prompts", str(prompts), "--groups", "2", "-G", "2",
            "--entries-per-shard", "1"]  # fmt: skip
    collect(policy, CollectConfig(prompts=PROMPTS, groups=2, group_size=2, entries_per_shard=1), out, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, lines = cli(monkeypatch, *base, "-G", "3", "--sigma", "0.3", "--seed", "1")
    assert code == 2 and len(lines) == 1, lines
    for named in ("--group-size (buffer 2, now 3)", "--sigma (buffer 0.5, now 0.3)", "--seed (buffer 0, now 1)"):
        assert named in lines[0]
    code, lines = cli(monkeypatch, *base, "--format", "zarr")
    assert code == 2 and "--format (buffer webdataset, now zarr)" in lines[0], lines
    assert not list(out.glob("*.zarr"))
    other = Pipeline(policy.config, policy.model, policy.text, policy.codec, "another-policy")
    with pytest.raises(ValueError, match=r"weights \(--checkpoint, --lora, --lora-alpha\) \(buffer [0-9a-f]+"):
        collect(other, CollectConfig(prompts=PROMPTS, groups=2, group_size=2, entries_per_shard=1), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, lines = cli(monkeypatch, *base)  # the same settings: resumes, nothing to do
    assert code == 0 and "skipped 2 finished" in lines[0], lines


def test_extending_groups_resumes_into_new_shards(tmp_path, policy):
    out = tmp_path / "buf"
    cfg = CollectConfig(prompts=PROMPTS, groups=3, group_size=2, entries_per_shard=2)
    collect(policy, cfg, out, progress=False)
    old = {p.name: checksum(p) for p in out.glob("shard-*")}
    s = collect(policy, cfg.model_copy(update={"groups": 5}), out, progress=False)
    assert (s.shards_written, s.shards_skipped) == (1, 2)
    assert {p.name: checksum(p) for p in out.glob("shard-*") if p.name in old} == old  # finished shards unchanged
    rows, run_id = read_manifest(out).to_pylist(), cfg.resolve(policy.config).run_id
    ids = sorted({r["entry_id"] for r in rows})
    assert ids == [f"{run_id}-{i:07d}" for i in range(5)] and {r["run_id"] for r in rows} == {run_id}
    (rec,) = collections(out)
    assert rec.groups == 5 and rec.segments == [[0, 3, 0], [3, 5, 2]] and verify_buffer(out).ok
    with pytest.raises(ValueError, match="--groups 2 is below the 5 groups"):
        collect(policy, cfg.model_copy(update={"groups": 2}), out, progress=False)
    full = Collection("", ".tar", "r", 2, 2, {}, [[0, 2, 0]]).extended(4)  # full shards: one run's layout
    assert full.segments == [[0, 4, 0]] and full.shard_names() == ["shard-000000.tar", "shard-000001.tar"]


def _gate():
    """A reward that blocks (until released) once the test says so, scoring like colour_match."""
    colour = get_spec("colour_match")
    entered, release = threading.Event(), threading.Event()

    def score(*args, **kw):
        entered.set()
        release.wait(60)
        return colour.fn(*args, **kw)

    register(dataclasses.replace(colour, name="gated_colour", fn=score), overwrite=True)
    return entered, release


def test_a_second_collect_into_one_buffer_is_refused_naming_the_holder(tmp_path, monkeypatch, policy):
    entered, release = _gate()
    cfg = CollectConfig(prompts=PROMPTS, groups=2, group_size=2, entries_per_shard=1, rewards="gated_colour=1",
                        metrics="")  # fmt: skip
    out, errors = tmp_path / "buf", []

    def first():
        try:
            collect(policy, cfg, out, progress=False)
        except Exception as e:  # reported by the assertion below
            errors.append(e)

    writer = threading.Thread(target=first)
    writer.start()
    try:
        assert entered.wait(60)  # the first collect holds the lock and is inside its first group
        temporaries = sorted(p.name for p in out.rglob(".*tmp-*"))
        with pytest.raises(ValueError) as err:
            collect(policy, cfg, out, progress=False)
        msg = str(err.value)
        assert f"is being written by another collect (PID {os.getpid()} on host" in msg and "\n" not in msg
        assert sorted(p.name for p in out.rglob(".*tmp-*")) == temporaries
    finally:
        release.set()
        writer.join(120)
    assert not errors and verify_buffer(out).ok and not (out / LOCK).exists()
    ref = tmp_path / "ref"
    collect(policy, cfg, ref, progress=False)
    assert {p.name: checksum(p) for p in out.glob("shard-*")} == {p.name: checksum(p) for p in ref.glob("shard-*")}


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_a_dead_holders_lock_is_taken_over_and_temporaries_are_pid_aware(tmp_path, policy):
    out = tmp_path / "buf"
    out.mkdir()
    (out / MARKER).write_text(marker_text("collect"))  # a buffer an earlier collect created
    dead = _dead_pid()
    (out / LOCK).write_text(json.dumps({"pid": dead, "host": "h", "since": "then"}))  # a kill -9's leftover
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / MANIFEST_DIR).mkdir()
        (out / f".shard-000005.tar.tmp-{dead}").write_bytes(b"x")
        (out / MANIFEST_DIR / f".shard-000005.tar.parquet.tmp-{dead}").write_bytes(b"x")
        (out / f".shard-000007.tar.tmp-{live.pid}").write_bytes(b"x")  # a live writer's: never removed
        assert len(remove_stale_tree(out)) == 2  # what a re-opened collect runs first (io.outputs.open_output)
        assert [p.name for p in out.rglob(".*tmp-*")] == [f".shard-000007.tar.tmp-{live.pid}"]
        collect(policy, CollectConfig(prompts=PROMPTS, groups=1, group_size=2), out, progress=False)
    finally:
        live.kill()
        live.wait()
    assert not (out / LOCK).exists() and len(read_manifest(out)) == 2
    with BufferLock(out), pytest.raises(ValueError, match=rf"PID {os.getpid()}"), BufferLock(out):
        pass


def test_verify_reports_an_interrupted_collection_as_incomplete(tmp_path, monkeypatch, policy):
    out = tmp_path / "buf"
    cfg = CollectConfig(prompts=PROMPTS, groups=3, group_size=2, entries_per_shard=1)
    collect(policy, cfg, out, progress=False)
    for p in (out / "shard-000002.tar", out / MANIFEST_DIR / "shard-000002.tar.parquet", out / MANIFEST_DIR / SEAL):
        p.unlink()  # as if killed before the last shard (so before the integrity record, written last)
    code, lines = cli(monkeypatch, "buffer", "verify", str(out))
    assert code == 1, lines
    assert lines[0] == ("INCOMPLETE the collection: 2 of 3 shards written (target 3 groups): interrupted; re-run "
                        "the same collect command to finish it")  # fmt: skip
    (out / "shard-000000.tar").unlink()
    (out / MANIFEST_DIR / "shard-000000.tar.parquet").unlink()
    (out / MANIFEST_DIR / "shard-000001.tar.parquet").unlink()
    (out / "shard-000001.tar").unlink()
    assert verify_buffer(out).incomplete  # nothing finished yet: still incomplete, not "not a buffer"
    collect(policy, cfg, out, progress=False)
    code, lines = cli(monkeypatch, "buffer", "verify", str(out))
    assert code == 0 and record_path(out).exists(), lines


def test_on_policy_rollouts_are_reused_only_by_the_same_run(tmp_path):
    from streamalign.schemas.run import run_record
    from streamalign.train.identity import check_run_folder

    cfg = TrainConfig(mode="on", prompts=PROMPTS, steps=2, batch_groups=2, group_size=3).resolve()
    out = tmp_path / "run"
    (out / "rollouts" / "manifest").mkdir(parents=True)  # a run killed before its first checkpoint
    (out / "run.yaml").write_text(run_record(cfg, "train"))
    assert check_run_folder(out, cfg.replace(steps=5), "auto") is False  # the same run restarts, reusing them
    with pytest.raises(ValueError, match=r"rollouts of another run \(optim.lr \(run.yaml 1e-05, now 0.001\)\)"):
        check_run_folder(out, cfg.replace(lr=1e-3), False)
    assert check_run_folder(out, cfg.replace(lr=1e-3), False, overwrite=True) is False


def test_zarr_writes_all_zero_chunks_so_a_missing_one_is_always_damage(tmp_path, zarr_buffer):
    from streamalign.buffer.formats import write_shard

    (entry,) = get_format("zarr").read(zarr_buffer / "shard-000000.zarr")
    entry.rewards = {k: torch.zeros_like(v) for k, v in entry.rewards.items()}  # zarr's fill value
    info = write_shard(get_format("zarr"), tmp_path / "s.zarr", [entry])
    assert (info.path / entry.entry_id / "reward.colour_match" / "c" / "0").is_file()
    (back,) = get_format("zarr").read(info.path)  # every chunk present: the strict read passes
    assert all(torch.equal(back.rewards[k], v) for k, v in entry.rewards.items())
