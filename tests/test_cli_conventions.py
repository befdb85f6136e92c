"""CLI conventions: --version, -h, typed choices in --help, one-line setting errors, --quiet / TQDM_DISABLE,
extras with one-line messages, model names from the user, registries with full protocols."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from streamalign import __version__
from streamalign.cli import app
from streamalign.evaluate.config import named
from streamalign.extras import require
from streamalign.io.progress import progress_bar
from streamalign.models.protocol import FAMILIES, get_family
from streamalign.train.objectives import OBJECTIVES, Objective, ObjectiveConfig

runner = CliRunner()


def test_version_and_short_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"streamalign {__version__}"
    r = runner.invoke(app, ["collect", "-h"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "[webdataset|zarr]" in r.output and "[initial|solver|kv-routing]" in r.output
    assert "--run-config" in r.output and "Model" in r.output and "(default: 64)" in r.output


def test_every_command_renders_its_help():
    """Help texts are plain text: brackets in them ("hf://ORG/REPO[@REV][/PATH]") once crashed --help, as
    typer renders help as rich markup."""
    commands = [[c.name] for c in app.registered_commands]
    for group in app.registered_groups:
        commands += [[group.name, c.name] for c in group.typer_instance.registered_commands]
    assert len(commands) > 15
    for cmd in commands:
        r = runner.invoke(app, [*cmd, "-h"], env={"COLUMNS": "250"})
        assert r.exit_code == 0, (cmd, r.exception)
    r = runner.invoke(app, ["collect", "-h"], env={"COLUMNS": "250"})
    assert "hf://ORG/REPO[@REV][/PATH]" in r.output


def test_bad_choice_is_one_line_naming_the_flag(tmp_path):
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--buffer", "b", "--autocast", "fp8"])
    assert r.exit_code == 2 and "--autocast" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--buffer", "b", "--objective", "ppo"])
    assert r.exit_code == 2 and "unknown objective 'ppo'" in r.stderr and "copo" in r.stderr


def test_quiet_hides_every_bar(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3)).disable
    monkeypatch.delenv("TQDM_DISABLE")
    assert not progress_bar(range(3)).disable and progress_bar(range(3), show=False).disable


def test_missing_extra_is_one_line():
    msg = r"--wandb needs the 'no_such_pkg' package: pip install 'streamalign\[wandb\]'"
    with pytest.raises(ValueError, match=msg):
        require("no_such_pkg", "wandb", "--wandb")


def test_models_are_named_by_what_the_user_gave():
    assert named("semi=runs/semi/adapter") == ("semi", "runs/semi/adapter")
    assert named("runs/on/adapter") == ("on", "runs/on/adapter")
    assert named("runs/merge/merged.safetensors") == ("merged", "runs/merge/merged.safetensors")


def test_registries_hold_full_protocols():
    assert set(OBJECTIVES) == {"copo", "kvpo", "nft", "sde-grpo"}
    for name, config in OBJECTIVES.items():
        assert issubclass(config, ObjectiveConfig)
        objective = config().build()
        assert isinstance(objective, Objective) and objective.name == name
        assert objective.fork in ("initial", "solver", "kv-routing")
    assert OBJECTIVES["sde-grpo"]().build().fork == "solver"
    assert OBJECTIVES["kvpo"]().build().fork == "kv-routing"
    assert OBJECTIVES["nft"]().build().state_dict() is not None  # NFT keeps old / reference copies
    assert OBJECTIVES["copo"]().build().state_dict() is None
    assert "wan" in FAMILIES and get_family("wan").build.__name__ == "CausalWanModel"
    with pytest.raises(ValueError, match="unknown model family 'mamba'"):
        get_family("mamba")
