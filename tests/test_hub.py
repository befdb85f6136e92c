"""``hf://ORG/REPO[@REV][/PATH]`` where a path is asked, resolved through huggingface_hub's cache: a cache
folder is built in the test in the library's layout (``models--ORG--REPO/refs/REV`` holding the commit,
``snapshots/COMMIT/...``) and the hub is never reached (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamalign.io import hub
from streamalign.models.checkpoint import save_safetensors
from streamalign.pipeline import Pipeline, resolve_config
from streamalign.schemas.config import ModelConfig
from tests.conftest import make_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLDER = "fedcba9876543210fedcba9876543210fedcba98"


def cache(home: Path) -> Path:
    """HF_HOME with the cache of two repositories: org/shapes (a generator file at 'main' = COMMIT and, at
    the older commit OLDER only, another one) and org/models (folders, as Wan or a reward model ships)."""
    root = home / "hub"
    repo = root / "models--org--shapes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for commit, seed in ((COMMIT, 3), (OLDER, 4)):
        (repo / "snapshots" / commit / "gen").mkdir(parents=True)
        save_safetensors(make_model(ModelConfig.load("shapes"), seed=seed).state_dict(),
                         repo / "snapshots" / commit / "gen" / "shapes.safetensors")  # fmt: skip
    models = root / "models--org--models"
    (models / "refs").mkdir(parents=True)
    (models / "refs" / "main").write_text(COMMIT)
    for sub in ("text_encoder", "vae", "reward"):
        (models / "snapshots" / COMMIT / sub).mkdir(parents=True)
        (models / "snapshots" / COMMIT / sub / "config.json").write_text("{}")
    return root


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """huggingface_hub pointed at a test cache, offline (as HF_HOME / HF_HUB_OFFLINE=1 would set it)."""
    from huggingface_hub import constants

    root = cache(tmp_path / "hf")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_RESOLVED", {})
    return root


def test_files_and_folders_resolve_to_the_cache_with_their_commit(offline):
    snap = offline / "models--org--shapes" / "snapshots"
    r = hub.resolve("hf://org/shapes/gen/shapes.safetensors")  # revision 'main' through refs/main
    assert r.path == snap / COMMIT / "gen" / "shapes.safetensors" and r.commit == COMMIT
    older = hub.resolve(f"hf://org/shapes@{OLDER}/gen/shapes.safetensors")  # a commit named directly
    assert older.path == snap / OLDER / "gen" / "shapes.safetensors" and older.commit == OLDER
    folder = hub.resolve("hf://org/models/reward")
    assert folder.path.is_dir() and folder.path.name == "reward" and folder.commit == COMMIT
    whole = hub.resolve("hf://org/models")
    assert whole.path == offline / "models--org--models" / "snapshots" / COMMIT
    assert hub.local("/a/local/path") == "/a/local/path" and hub.local(None) is None


def test_every_path_flag_takes_a_hub_id(offline):
    """--checkpoint (the generator loads from the cache; its policy id is the file's), --wan-dir (the text
    encoder's and VAE's folder) and --reward-path (the reward model's folder)."""
    from streamalign.rewards.sources import sources_of

    pipe = Pipeline.load("shapes", "hf://org/shapes/gen/shapes.safetensors")
    file = offline / "models--org--shapes" / "snapshots" / COMMIT / "gen" / "shapes.safetensors"
    local = Pipeline.load("shapes", file)
    assert pipe.policy_id == local.policy_id
    a, b = pipe.model.state_dict(), local.model.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    cfg = resolve_config("tiny", wan_dir="hf://org/models")
    assert cfg.text.path == cfg.codec.path == str(offline / "models--org--models" / "snapshots" / COMMIT)
    (source,) = sources_of({"clip": "hf://org/models/reward"}, {}, {})
    assert source.path == str(offline / "models--org--models" / "snapshots" / COMMIT / "reward")
    source.check()  # the folder exists


@pytest.mark.parametrize(
    ("hub_id", "message"),
    [
        ("hf://org/absent/model.pt", "HF_HUB_OFFLINE=1 forbids downloading"),  # not cached, offline
        ("hf://org/shapes/gen/none.safetensors", "has no file or folder 'gen/none.safetensors'"),
        ("hf://org/shapes@v9/gen/shapes.safetensors", "not in the Hugging Face cache"),  # unknown revision
        ("hf://only-a-name", "is not a hub id: write hf://ORG/REPO[@REVISION][/PATH]"),
        ("hf://org/shapes/../x", "is not a hub id"),
    ],
)
def test_an_id_that_does_not_resolve_is_one_clear_line(offline, hub_id, message):
    with pytest.raises(hub.HubError) as e:
        hub.resolve(hub_id)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_command_line_honours_hf_home_and_records_the_commit(tmp_path):
    """`generate --checkpoint hf://...` in a process whose HF_HOME is the test cache and HF_HUB_OFFLINE=1:
    run.yaml keeps the id in the config and records the commit it resolved to; an uncached id is one
    line and exit 2, before anything is written."""
    cache(tmp_path / "hf")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    hub_id = "hf://org/shapes@main/gen/shapes.safetensors"
    args = [sys.executable, "-m", "streamalign.cli", "-q", "generate", "a red circle moving left on a black "
            "background", "--frames", "3", "--threads", "1"]  # fmt: skip
    ok = subprocess.run([*args, "--checkpoint", hub_id, "--out", str(tmp_path / "gen")], env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    record = yaml.safe_load((tmp_path / "gen" / "run.yaml").read_text())
    assert record["config"]["model"]["checkpoint"] == hub_id
    assert record["streamalign"]["hub"] == {hub_id: COMMIT}
    bad = subprocess.run([*args, "--checkpoint", "hf://org/absent/g.pt", "--out", str(tmp_path / "bad")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "HF_HUB_OFFLINE=1 forbids downloading" in bad.stderr, bad.stderr[-2000:]
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
