"""An out-of-tree package adds an objective, a world and a command with one file: installed as a distribution (a
``.dist-info`` with entry points, as pip writes it) on the path of a fresh interpreter, the registries find
both, ``train`` takes the objective by name and its help lists it; the train stage's planner, a higher layer
than ``streamalign.plan``, is found the same way (pyproject.toml's ``streamalign.planners``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''
from typing import Literal

from streamalign.registry import COMMANDS, Command
from streamalign.schemas.run import RunConfig, arg
from streamalign.train.objectives import register_objective
from streamalign.train.objectives.copo import CoPOConfig
from streamalign.worlds import World, register_world


@register_objective
class HalfCoPO(CoPOConfig):
    """CoPO at half the clip (a plug-in's objective)."""

    name: Literal["half-copo"] = "half-copo"
    clip_eps: float = 0.1


register_world(World("probe", "clip_text=1", "clip_text=1", {"held-in": lambda: ("a red square",)}, "clip_text"))


class GreetRun(RunConfig):
    """Greet someone (a plug-in's command)."""

    who: str = arg("world", "Whom to greet.")


def greet_stage(cfg: GreetRun) -> str:
    return f"hello {cfg.who}"


COMMANDS.register("probe greet", Command("probe", "greet", GreetRun, "probe_plugin:greet_stage"))
'''

PROBE = '''
import json, sys
from streamalign.train.config import TrainConfig
from streamalign.train.objectives import OBJECTIVES
from streamalign.worlds import WORLDS
cfg = TrainConfig(buffer="b", objective={"name": "half-copo"})
world = WORLDS.get("probe")
print(json.dumps({"objectives": OBJECTIVES.names(), "worlds": WORLDS.names(), "objective": type(cfg.objective).__name__,
                  "clip_eps": cfg.objective.clip_eps, "prompts": world.prompt_sets["held-in"]()}))
'''


def install(site: Path) -> None:
    """The plug-in as pip would install it: its module and a dist-info naming its entry points."""
    (site / "probe_plugin.py").write_text(PLUGIN)
    info = site / "probe_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[streamalign.objectives]\nhalf-copo = probe_plugin\n\n[streamalign.worlds]\nprobe = probe_plugin\n\n"
        "[streamalign.commands]\nprobe = probe_plugin\n")


def run(code: str, site: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=site or Path.cwd())  # fmt: skip


def test_an_installed_plugin_adds_an_objective_and_a_world(tmp_path):
    install(tmp_path)
    done = run(PROBE, tmp_path)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"copo", "nft", "sde-grpo", "kvpo", "half-copo"} <= set(got["objectives"])
    assert got["worlds"] == ["shapes", "probe"]
    assert got["objective"] == "HalfCoPO" and got["clip_eps"] == 0.1 and got["prompts"] == ["a red square"]
    helped = run("from streamalign.cli import app\napp(['train', '--help'])", tmp_path)
    assert "half-copo" in helped.stdout
    greeted = run("from streamalign.cli import app\napp(['probe', 'greet', '--who', 'you'])", tmp_path)
    assert greeted.stdout.strip() == "hello you", greeted.stderr


def test_without_the_plugin_its_objective_is_refused(tmp_path):
    code = 'from streamalign.train.config import TrainConfig\nTrainConfig(buffer="b", objective={"name": "half-copo"})'
    done = run(code)
    assert done.returncode != 0 and "half-copo" in done.stderr


def test_the_train_planner_is_found_through_its_entry_point():
    from importlib.metadata import entry_points

    from streamalign import plan
    from streamalign.train.plan import plan_train

    assert [ep.value for ep in entry_points(group="streamalign.planners", name="train")] == [
        "streamalign.train.plan:plan_train"
    ]
    assert plan.planner("train") is plan_train  # tests/test_layers.py: streamalign.plan never imports the trainer
