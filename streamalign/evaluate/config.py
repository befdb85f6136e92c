"""Run configs of `evaluate` and `merge`: the models compared, the paired (prompt, seed) design, rewards."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..rewards import CompositeReward
from ..rewards.sources import reward_of
from ..schemas.config import ModelConfig
from ..schemas.run import RunConfig, Section, arg
from ..schemas.sections import (
    EvalPromptSection,
    Hardware,
    ModelSection,
    PolicySection,
    PromptSection,
    PromptSet,
    ResultsOut,
    RewardSection,
    absolute,
    absolute_fields,
)
from ..worlds import default_prompts, default_rewards


class EvalSettings(ModelSection, EvalPromptSection, RewardSection):
    """Evaluation"""

    seeds_per_prompt: int = Field(4, ge=1, description="Seeds per prompt (pair i uses --seed + i for every model).",
                                  json_schema_extra={"flag": "--seeds"})  # fmt: skip
    seed: int = arg(2_000_000, "First seed of the (prompt, seed) pairs: identical noise for every model.")
    samples: int = Field(4, ge=0, description="(prompt, seed) pairs written as MP4s, GIFs and frame grids.")
    n_boot: int = Field(2000, ge=1, description="Bootstrap resamples of the paired differences.")
    batch: int | None = Field(None, ge=1, description="Videos rolled out at once (default: from memory, at most 64).")

    def resolved(self) -> EvalSettings:
        """Rewards and prompts from the model's world where none are given."""
        model = ModelConfig.load(self.config)
        rewards, metrics = default_rewards(model, self.rewards, self.metrics)
        prompts = default_prompts(model, self.prompts, self.prompt_set)
        return self.model_copy(update={"rewards": rewards, "metrics": metrics, "prompts": prompts})

    def reward(self, hold: str | None = None, load: bool = False) -> CompositeReward:
        """The composite reward (and OOD metrics) scored, the world's by default (`hold`, `load`: as
        ``rewards.sources.reward_of``'s)."""
        terms = default_rewards(ModelConfig.load(self.config), self.rewards, self.metrics)
        return reward_of(self, *terms, hold=hold, load=load)


class Compare(Section):
    """Models"""

    lora: list[str] = arg([], "Adapter to compare with the base (repeatable; NAME=PATH names it).")
    weights: list[str] = arg([], "Full merged weights to compare (repeatable; NAME=PATH names it).")

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("lora", "weights"):
                if isinstance(data.get(key), list):
                    data = {**data, key: [absolute_named(v) for v in data[key]]}
        return data


class VBenchSection(Section):
    """VBench export"""

    export_vbench: str | None = arg(None, "Also write every model's videos laid out for VBench into this folder "
                                    "(<model>/<list>/<prompt>-<i>.mp4, export.json, vbench.sh).")  # fmt: skip
    vbench_prompts: str | None = arg(None, "VBench prompt list: a .txt file or a folder of them (its "
                                     "prompts_per_dimension); default: the evaluation prompts.")  # fmt: skip
    vbench_samples: int = Field(5, ge=1, description="Videos per prompt (VBench: 5).")
    vbench_seed: int = arg(2, "Seed of the first video of each list (VBench: 2); video j uses seed + j.")
    vbench_fps: float = arg(16.0, "Frames per second of the exported MP4s.")

    def exporter(self, fallback: list[str]):
        """The export (None when not asked for)."""
        from .vbench import VBenchExport, prompt_lists

        if self.export_vbench is None:
            return None
        lists = prompt_lists(self.vbench_prompts, fallback)
        return VBenchExport(self.export_vbench, lists, self.vbench_samples, self.vbench_seed, self.vbench_fps)


class EvaluateRun(RunConfig):
    """Score the base model and every adapter / merged model on the same prompts and noise; write a report
    with paired differences vs base (95% bootstrap intervals), per-prompt values, plots, samples."""

    models: Compare = Compare()
    eval: EvalSettings = EvalSettings()
    vbench: VBenchSection = VBenchSection()
    hardware: Hardware = Hardware()


class MergeSettings(Section):
    """Merge"""

    on: str = arg(..., "On-policy LoRA (peft folder); its scale is swept.")
    semi: str | None = arg(None, "Semi-on-policy LoRA (peft folder), at --s-semi.")
    s_semi: float = arg(1.0, "Scale of the semi-on-policy LoRA.")
    scales: tuple[float, ...] = arg((0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "s_on values to evaluate, comma-separated.")
    ood_metric: str | None = arg(None, "OOD metric of the dual criterion: a scored reward/metric, or "
                                 "vbench:<dimension> read from --ood-results (default: the world's).")  # fmt: skip
    ood_results: str | None = arg(None, "Folder of VBench results per row (<row>/*_eval_results.json or "
                                  "<row>_eval_results.json; rows base, s0.2, ...) for a vbench: OOD "
                                  "metric.")  # fmt: skip
    ood_tolerance: float = arg(0.0, "Allowed drop of the OOD metric vs base.")
    full_weights: bool = arg(False, "Also write merged.safetensors.")

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data: Any) -> Any:
        return absolute_fields(data, ("on", "semi", "ood_results"))

    @model_validator(mode="after")
    def _scales(self) -> MergeSettings:
        if not self.scales or any(s < 0 for s in self.scales):
            raise ValueError(f"--scales must be non-negative numbers, got {list(self.scales)}")
        if self.ood_metric and self.ood_metric.startswith("vbench:") and self.ood_results is None:
            raise ValueError(f"--ood-metric {self.ood_metric} needs --ood-results DIR (the VBench results per row)")
        return self


class SweepEval(EvalSettings):
    """Evaluation"""

    prompt_set: PromptSet = arg("held-in", "The world's prompt set when no file is given.")


class MergeRun(RunConfig):
    """W0 + s_semi dW_semi + s_on dW_on, exactly, for every s_on in --scales; evaluate each and select the
    largest scale that raises the composite without lowering the OOD metric (else keep the base)."""

    merge: MergeSettings
    eval: SweepEval = SweepEval()
    vbench: VBenchSection = VBenchSection()
    hardware: Hardware = Hardware()


def absolute_named(spec: str) -> str:
    """'NAME=PATH' or 'PATH' with the path made absolute (a bare path keeps the name it was given)."""
    name, path = named(spec)
    return f"{name}={absolute(path)}"


def named(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); a bare path is named after its run folder (runs/semi/adapter -> semi)."""
    from pathlib import Path

    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    p = Path(spec)
    return (p.parent.name if p.name == "adapter" and p.parent.name else p.stem), spec


class NoiseStudy(Section):
    """Study"""

    n_prompts: int = Field(4, ge=1, description="Prompts used (spread over the set).")
    seeds: int = Field(4, ge=1, description="Fork groups per prompt and pivot.")
    group_size: int = Field(8, ge=2, description="Branches per group.", json_schema_extra={"short": "-G"})


class NoiseSourcesRun(RunConfig):
    """Output variance when only the pivot's initial noise changes vs only one solver noise (AR-CoPO Fig. 6)."""

    model: PolicySection = PolicySection()
    prompts: PromptSection = PromptSection()
    rewards: RewardSection = RewardSection()
    study: NoiseStudy = NoiseStudy()
    hardware: Hardware = Hardware()
    results: ResultsOut = ResultsOut()


class BudgetStudy(Section):
    """Study"""

    n_prompts: int = Field(8, ge=1, description="Training prompts (spread over the set).")
    iterations: int = Field(15, ge=1, description="On-policy iterations per run (equal budget).")
    batch_groups: int = Field(8, ge=1, description="Fresh groups per iteration.")
    group_size: int = Field(8, ge=2, description="Branches per group.", json_schema_extra={"short": "-G"})
    lr: float = Field(3e-5, gt=0, description="AdamW learning rate (all runs; the demo's, from `experiment sweep`).")
    eval_every: int = Field(6, ge=1, description="Updates between curve points.")
    eval_seeds: int = Field(4, ge=1, description="Fresh seeds per prompt for the curves and the table.")
    seed: int = arg(0, "Seed of every run.")


class ObjectiveStudy(BudgetStudy):
    """Study"""

    runs: tuple[str, ...] = arg(("copo", "copo-offpolicy", "nft", "sde-grpo", "sde-grpo-eps0.2"),
                                "Comma-separated: copo, copo-offpolicy, nft, sde-grpo, sde-grpo-eps0.2 "
                                "(sde-grpo with --clip-eps 0.2), kvpo (a rolling-cache --config).")  # fmt: skip


class ObjectivesRun(RunConfig):
    """Equal-budget on-policy comparison of the objectives on the same prompts and seeds (AR-CoPO Fig. 2)."""

    model: ModelSection = ModelSection()
    prompts: PromptSection = PromptSection()
    study: ObjectiveStudy = ObjectiveStudy()
    hardware: Hardware = Hardware()
    results: ResultsOut = ResultsOut()


class RegimeStudy(BudgetStudy):
    """Study"""  # I iterations of B groups: every regime gets I x B rollout groups and I x K updates

    updates_per_iter: int = Field(2, gt=0, description="Updates per iteration K; every regime gets I x K updates.")


class RegimesRun(RunConfig):
    """On-policy vs semi-on-policy vs off-policy (semi without the clip) CoPO at equal budget (AR-CoPO Table 2)."""

    model: ModelSection = ModelSection()
    prompts: PromptSection = PromptSection()
    rewards: RewardSection = RewardSection()
    study: RegimeStudy = RegimeStudy()
    hardware: Hardware = Hardware()
    results: ResultsOut = ResultsOut()


class SweepStudy(RegimeStudy):
    """Study"""  # every (mode, lr, tau scale, clip eps) cell at the regimes' equal budget

    modes: tuple[Literal["semi", "on"], ...] = arg(("semi", "on"), "Comma-separated training modes: semi, on.")
    lrs: tuple[float, ...] = arg((1e-5, 1e-4), "Comma-separated learning rates.")
    tau_scales: tuple[float, ...] = arg((1.0, 10.0), "Comma-separated CoPO --tau-scale values.")
    clip_epss: tuple[float, ...] = arg((1e-4, 1e-2), "Comma-separated CoPO --clip-eps values.")


class SweepRun(RunConfig):
    """CoPO hyper-parameter sweep: lr x tau scale x clip eps for semi- and on-policy at equal budget, each cell
    paired vs the base on fresh seeds (reward gain, OOD change, clip fraction, approx KL)."""

    model: ModelSection = ModelSection()
    prompts: PromptSection = PromptSection()
    rewards: RewardSection = RewardSection()
    study: SweepStudy = SweepStudy()
    hardware: Hardware = Hardware()
    results: ResultsOut = ResultsOut()


class DemoRun(RunConfig):
    """Collect -> train semi -> train on -> merge sweep -> evaluate on held-out prompts, on the shapes world."""

    quick: bool = arg(False, "A smaller run for CI (< 1 min).")
    hardware: Hardware = Hardware()
