"""Runs described by files: nested run configs, flat routing, one-line errors naming the field and file,
``run.yaml`` written by every stage, and ``--run-config run.yaml`` re-running the same run byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.collect.run import CollectRun
from streamalign.io.files import checksum
from streamalign.models.checkpoint import save_safetensors
from streamalign.schemas.config import ModelConfig
from streamalign.schemas.run import leaf_paths, read_run_file
from streamalign.train.config import TrainConfig
from streamalign.worlds.shapes import held_in_prompts
from tests.conftest import make_model

runner = CliRunner()
PROMPTS = [p.text for p in held_in_prompts()[::60]]


def test_flat_keywords_route_to_their_sections():
    flat = TrainConfig(mode="semi", buffer="b", lr=1e-4, steps=7, objective="nft", kl_w=0.5, threads=1)
    nested = TrainConfig(mode="semi", data={"buffer": "b"}, optim={"lr": 1e-4}, schedule={"steps": 7},
                         objective={"name": "nft", "kl_w": 0.5}, hardware={"threads": 1})  # fmt: skip
    assert flat == nested
    assert flat.objective.build().kl_w == 0.5 and flat.optim.lr == 1e-4
    # every leaf of every run config has one place (a leaf shared by union members is one leaf)
    assert leaf_paths(TrainConfig)["clip_eps"] == ("objective", "clip_eps")
    assert leaf_paths(CollectRun)["group_size"] == ("collect", "group_size")


def test_errors_name_the_field_and_the_file(tmp_path):
    with pytest.raises(ValueError, match="unknown setting 'lrr'"):
        TrainConfig.build(None, lrr=1)
    bad = tmp_path / "typo.yaml"
    bad.write_text("mode: semi\ndata:\n  buffer: b\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown setting 'optim.lrr' in .*typo.yaml"):
        TrainConfig.build(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("mode: semi\noptim: [1, 2\n")
    with pytest.raises(ValueError, match=r"broken.yaml:\d+ is not valid YAML"):
        TrainConfig.build(broken)
    with pytest.raises(ValueError, match=r"setting 'optim.batch_groups'.*greater than 0"):
        TrainConfig.build(None, buffer="b", batch_groups=0)
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--buffer", "b", "--batch-groups", "0"])
    assert r.exit_code == 2 and "optim.batch_groups" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "random-shapes.safetensors"
    save_safetensors(make_model(ModelConfig.load("shapes"), seed=3).state_dict(), path)
    return path


def test_collect_and_train_rerun_from_their_run_files(tmp_path, base):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--checkpoint", str(base)]
    r = runner.invoke(app, ["collect", "--out", str(tmp_path / "buf"), "--groups", "2", "-G", "3",
                            "--entries-per-shard", "1", "--prompts", str(prompts), *common])  # fmt: skip
    assert r.exit_code == 0, r.output
    record = yaml.safe_load((tmp_path / "buf" / "run.yaml").read_text())
    assert record["streamalign"]["stage"] == "collect" and record["streamalign"]["command"].startswith("streamalign")
    assert record["config"]["collect"]["prompts"] == PROMPTS  # resolved: the file's lines, the world's rewards
    assert record["config"]["collect"]["rewards"].startswith("colour_match=1")
    r = runner.invoke(app, ["collect", "--out", str(tmp_path / "buf2"), "--run-config", str(tmp_path / "buf/run.yaml")])
    assert r.exit_code == 0, r.output
    shards = sorted(p.name for p in (tmp_path / "buf").glob("shard-*"))
    assert shards and all(checksum(tmp_path / "buf" / s) == checksum(tmp_path / "buf2" / s) for s in shards)

    args = ["--buffer", str(tmp_path / "buf"), *common, "--steps", "2", "--batch-groups", "2", "--lr", "1e-4",
            "--lora-rank", "4", "--lora-alpha", "8", "--threads", "1"]  # fmt: skip
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "one"), *args])
    assert r.exit_code == 0, r.output
    saved = tmp_path / "one" / "run.yaml"
    assert read_run_file(saved)["optim"]["lr"] == 1e-4
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "two"), "--run-config", str(saved)])
    assert r.exit_code == 0, r.output
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "one" / adapter).read_bytes() == (tmp_path / "two" / adapter).read_bytes()
    # a flag overrides one field of the file and nothing else
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "three"), "--run-config", str(saved), "--steps", "1"])
    assert r.exit_code == 0, r.output
    one, three = read_run_file(saved), read_run_file(tmp_path / "three" / "run.yaml")
    assert three["schedule"]["steps"] == 1 and {**three, "schedule": one["schedule"]} == one
