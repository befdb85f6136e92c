"""Command-line interface (thin): parse flags or ``--run-config``, build the run config, call one stage.

Every command is a run config (its fields are the flags, its docstring the help) and one stage function
``module:function(cfg[, out]) -> text`` (or ``(text, exit code)``), imported only when the command runs;
both are a :class:`~streamalign.registry.Command` in the registry ``COMMANDS``, which plug-in packages extend.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Annotated, Literal

import typer

from .. import __version__
from ..buffer.inspect import BufferRun, SealRun, VerifyRun
from ..buffer.stats import StatsRun
from ..buffer.urls import local_folder
from ..collect.run import CollectRun
from ..evaluate.config import DemoRun, EvaluateRun, MergeRun, NoiseSourcesRun, ObjectivesRun, RegimesRun, SweepRun
from ..generate.run import GenerateRun
from ..io.outputs import overwrite_permitted
from ..models.info import ConvertRun, ModelInfoRun
from ..plan import PlanRun
from ..registry import COMMANDS, Command
from ..schemas.run import RunConfig
from ..train.config import TrainConfig
from ..train.health import ReportRun
from ..worlds.shapes.distill import DistillConfig
from ..worlds.shapes.pretrain import PretrainConfig
from ..worlds.shapes.quality import CheckRun, PromptsRun
from .flags import stage_command

app = typer.Typer(name="streamalign", no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Align streaming (chunk-autoregressive, few-step) text-to-video generators with reward models.")
GROUPS = {"model": "Inspect, validate and convert generator checkpoints.",
          "shapes": "The built-in shapes world: prompts, generator pre-training and distillation, sample quality.",
          "buffer": "Inspect, verify and seal replay buffers.",
          "experiment": "The AR-CoPO analyses: noise sources, objectives, training regimes, a CoPO sweep."}  # fmt: skip
sub = {name: typer.Typer(help=text, no_args_is_help=True) for name, text in GROUPS.items()}
for name, group in sub.items():
    app.add_typer(group, name=name)


class Presets(RunConfig):
    """List the shipped model config presets."""


# the built-in commands: (group, command, run config, "module:function", --out help (None: no --out), --out
# default (None: required)), see registry.Command
STAGES = (
    ("model", "configs", Presets, "streamalign.models.info:configs_stage", None, None),
    ("model", "info", ModelInfoRun, "streamalign.models.info:info_stage", None, None),
    ("model", "convert", ConvertRun, "streamalign.models.info:convert_stage", None, None),
    ("shapes", "prompts", PromptsRun, "streamalign.worlds.shapes.quality:prompts_stage", None, None),
    ("shapes", "pretrain", PretrainConfig, "streamalign.worlds.shapes.pretrain:pretrain_stage",
     "Weights, recipe, curve.",
     "runs/shapes-pretrain"),
    ("shapes", "distill", DistillConfig, "streamalign.worlds.shapes.distill:distill_stage", "Weights, recipe, curve.",
     "runs/shapes-distill"),
    ("shapes", "check", CheckRun, "streamalign.worlds.shapes.quality:check_stage", None, None),
    (None, "plan", PlanRun, "streamalign.plan:plan_command", None, None),
    (None, "collect", CollectRun, "streamalign.collect.run:collect_stage", "Buffer folder (shards + manifest/).", None),
    (None, "evaluate", EvaluateRun, "streamalign.evaluate.report:evaluate_stage", "Report folder.", None),
    (None, "merge", MergeRun, "streamalign.evaluate.sweep:merge_stage",
     "Sweep folder (sweep.*, adapters/, adapter/).", None),
    (None, "demo", DemoRun, "streamalign.evaluate.demo:demo_stage", "Demo folder (buffer, runs, sweep, report).",
     "runs/demo"),
    ("experiment", "noise-sources", NoiseSourcesRun, "streamalign.evaluate.experiments:noise_sources_stage",
     "Folder: noise_sources.md/json/png.", "runs/noise-sources"),
    ("experiment", "objectives", ObjectivesRun, "streamalign.evaluate.experiments:objectives_stage",
     "Folder: objectives.md/json/png and one run per objective.", "runs/objectives"),
    ("experiment", "regimes", RegimesRun, "streamalign.evaluate.experiments:regimes_stage",
     "Folder: regimes.md/json/png, buffer/ and one run per regime.", "runs/regimes"),
    ("experiment", "sweep", SweepRun, "streamalign.evaluate.experiments:sweep_stage",
     "Folder: sweep.md/json/png, buffer/ and one run per cell.", "runs/sweep"),
    ("buffer", "info", BufferRun, "streamalign.buffer.inspect:info_stage", None, None),
    ("buffer", "verify", VerifyRun, "streamalign.buffer.inspect:verify_stage", None, None),
    ("buffer", "seal", SealRun, "streamalign.buffer.inspect:seal_stage", None, None),
    (None, "stats", StatsRun, "streamalign.buffer.stats:stats_stage", None, None),
    (None, "report", ReportRun, "streamalign.train.health:report_stage", None, None),
)  # fmt: skip


def emit(result: str | tuple[str, int]) -> None:
    """Print a stage's text; a (text, code) result also sets the exit code."""
    text, code = result if isinstance(result, tuple) else (result, 0)
    if text:
        print(text)
    if code:
        raise typer.Exit(code)


def call(target: str, *args):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)(*args)


def out_folder(out: str) -> Path:
    """The local folder an ``--out`` names (a path or file:// URL; as a Path, file:// would lose a slash)."""
    return local_folder(out, "--out", "outputs are written to a local folder (or one a store mounts); copy a "
                        "buffer to its store after collect, then read it by URL (s3://, gs://, pipe:)")  # fmt: skip


def register(group: str | None, name: str, config: type, target: str, out_help: str | None, out_default: str | None):
    """Command `name`: the run config's flags (and ``--out``); help from the run config's docstring."""

    def command(cfg, **out) -> None:
        emit(call(target, cfg, *(out_folder(v) for v in out.values())))

    params = [inspect.Parameter("cfg", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if out_help is not None:
        default = out_default or inspect.Parameter.empty
        params.append(inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[str, typer.Option(help=out_help)]))  # fmt: skip
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = config.__doc__
    if group and group not in sub:  # a plug-in's group
        sub[group] = typer.Typer(help=f"{group} (a plug-in's commands).", no_args_is_help=True)
        app.add_typer(sub[group], name=group)
    stage_command(sub[group] if group else app, name, config, group)(command)


for entry in STAGES:
    COMMANDS.register((c := Command(*entry)).key, c)
for c in COMMANDS.values():  # the built-in ones and those of installed plug-in packages
    register(*c)


def _version(value: bool) -> None:
    if value:
        print(f"streamalign {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (as TQDM_DISABLE=1); warnings only.")]
    = False,
    log_level: Annotated[Literal["debug", "info", "warning", "error"], typer.Option(help="Logging level.")] = "info",
) -> None:
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' bars (read when it is imported, later)
    logging.basicConfig(level="WARNING" if quiet else log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


@stage_command(app, "train", TrainConfig)
def train_cmd(cfg: TrainConfig, out: Annotated[Path, typer.Option(help="Run folder (adapter/, checkpoints/, ...).")],
              resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint.")] = False
              ) -> None:  # fmt: skip
    """Train a LoRA on the pivot chunk (CoPO, NFT or SDE-GRPO): semi-on-policy from a buffer, or on-policy.
    Under `torchrun --nproc_per_node N` gradients are averaged over ranks."""
    if resume and overwrite_permitted(out):
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    emit(call("streamalign.train.loop:train_stage", cfg, out, resume))


@stage_command(app, "generate", GenerateRun)
def generate_cmd(cfg: GenerateRun, prompt: Annotated[str | None, typer.Argument(
        help="Prompt or scenes: 'one[5s] | two[10s#] | three'.")] = None, out: Annotated[Path, typer.Option(
        help="Folder for NNNN.mp4 and generate.json.")] = Path("runs/generate")) -> None:  # fmt: skip
    """Text to video (MP4) with base, adapter or merged weights; long videos with the rolling KV cache;
    multi-scene lines (`|` between scenes, `[Ns]` durations, `[Ns#]` a hard cut into that scene)."""
    emit(call("streamalign.generate.run:generate_stage", cfg, prompt, out))
