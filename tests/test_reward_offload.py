"""Reward models held or offloaded by ``--reward-offload`` (issue 28 item 1): the rule (``plan.reward_hold``,
the same for ``plan`` and the stages) against hand cases; an adapter's offload / onload round trip; the stages
(collect, evaluate) calling them around scoring; the reward section the pre-load GPU check plans."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.plan import (
    CUDA_RESERVE,
    REWARD_PLANNERS,
    GiB,
    Phase,
    PlanContext,
    StagePlan,
    planned_rewards,
    reward_hold,
    stage_reward_hold,
)
from streamalign.rewards.models import load_reward_model
from streamalign.rewards.models.base import RewardModel
from streamalign.rewards.sources import _LOADED
from streamalign.schemas.sections import RewardSection
from tests.test_rewards import _tiny_clip


@pytest.mark.parametrize(
    "mode, peak_gib, memory_gib, want",
    [
        ("keep", 200.0, 79.1, "keep"),  # as given, fit or not
        ("cpu", 1.0, 79.1, "cpu"),
        ("auto", None, None, "keep"),  # no plan (a CPU run): nothing to gain
        ("auto", 70.0, 79.1, "keep"),  # 70 + 1 reserve <= 79.1
        ("auto", 78.1, 79.1, "keep"),  # exactly the memory with the reserve
        ("auto", 78.2, 79.1, "cpu"),  # 79.2 > 79.1
        ("auto", 40.0, 39.4, "cpu"),
    ],
)
def test_reward_hold_rule(mode, peak_gib, memory_gib, want):
    peak = None if peak_gib is None else round(peak_gib * GiB)
    memory = None if memory_gib is None else round(memory_gib * GiB)
    assert GiB == CUDA_RESERVE  # the hand cases count a 1 GiB reserve
    assert reward_hold(mode, peak, memory) == want


def test_reward_hold_refuses_other_modes():
    with pytest.raises(ValueError, match="--reward-offload must be auto, keep or cpu; got 'free'"):
        reward_hold("free")


def _stage(peak: int, kept: bool | None = None) -> StagePlan:
    sp = StagePlan("collect", "group", 1, [Phase("fork", peak, 0)])
    if kept is not None:
        sp.notes["rewards_kept"] = kept
    return sp


def test_a_stage_resolves_auto_from_its_plan():
    assert stage_reward_hold("auto", None) == "keep"  # no plan (CPU)
    assert stage_reward_hold("auto", _stage(1, kept=False)) == "cpu"
    assert stage_reward_hold("auto", _stage(1, kept=True)) == "keep"
    assert stage_reward_hold("auto", _stage(1)) == "keep"  # planned without reward models
    assert stage_reward_hold("keep", _stage(1, kept=False)) == "keep"
    assert stage_reward_hold("cpu", None) == "cpu"


@pytest.mark.parametrize(
    "mode, kept_gib, off_gib, want_kept, runs",
    [
        ("auto", 70.0, 60.0, True, 1),  # fits kept: planned once, kept
        ("auto", 79.0, 60.0, False, 2),  # 80 > 79.1: planned again offloaded
        ("keep", 79.0, 60.0, True, 1),  # does not fit, but keep was asked for
        ("cpu", 10.0, 9.0, False, 1),
    ],
)
def test_the_plan_decides_by_the_same_rule(mode, kept_gib, off_gib, want_kept, runs):
    """PlanContext.with_rewards on a stand-in context: the stage planned kept, then offloaded when the rule
    says cpu (hand peaks; the real stages are planned in tests/test_plan_rewards.py)."""
    ctx = SimpleNamespace(rewards=["rm"], rewards_kept=None, calls=[],
                          run=SimpleNamespace(scoring=SimpleNamespace(reward_offload=mode), memory=round(79.1 * GiB)))

    def stage() -> StagePlan:
        ctx.calls.append(ctx.rewards_kept)
        return _stage(round((kept_gib if ctx.rewards_kept else off_gib) * GiB))

    sp = PlanContext.with_rewards(ctx, stage)
    assert sp.notes["rewards_kept"] is want_kept and len(ctx.calls) == runs


# ------------------------------------------------------------------------------------ the adapters' round trip
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    _tiny_clip(folder)
    return folder


class MoveLog:
    """Every ``net.to(...)`` of a reward model: (args, the parameters' devices after it)."""

    def __init__(self, model: RewardModel) -> None:
        self.calls: list[tuple] = []
        real = model.net.to

        def to(*args, **kwargs):
            out = real(*args, **kwargs)
            self.calls.append((args, {p.device.type for p in model.net.parameters()}))
            return out

        model.net.to = to  # type: ignore[method-assign]


def test_offload_onload_round_trip_keeps_the_scores(clip_folder):
    model = load_reward_model("clip", clip_folder, device="cpu", dtype="float32", batch_size=3)
    v = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    before = model.frame_scores(v, prompts)["score"]
    state = {k: t.clone() for k, t in model.net.state_dict().items()}
    log = MoveLog(model)
    model.offload()
    assert model._offloaded and log.calls == [(("cpu",), {"cpu"})]
    model.onload()  # back to its device, in its dtype
    assert not model._offloaded and log.calls[1][0] == (model.device, model.dtype)
    assert all(p.dtype == torch.float32 for p in model.net.parameters())
    assert all(torch.equal(state[k], t) for k, t in model.net.state_dict().items())
    model.onload()
    assert len(log.calls) == 2  # nothing to move when the weights are on the device
    assert torch.equal(model.frame_scores(v, prompts)["score"], before)
    # held "cpu": each scoring call onloads first and offloads after, the scores unchanged
    model.set_hold("cpu")
    assert torch.equal(model.frame_scores(v, prompts)["score"], before)
    assert [a for a, _ in log.calls[2:]] == [("cpu",)] and model._offloaded
    assert torch.equal(model.frame_scores(v, prompts)["score"], before)
    assert [a for a, _ in log.calls[2:]] == [("cpu",), (model.device, model.dtype), ("cpu",)]
    with pytest.raises(Exception, match="hold must be keep or cpu, got 'free'"):
        model.set_hold("free")


# ------------------------------------------------------------------------------------------------- the stages
@pytest.fixture
def spy(monkeypatch):
    """Counts of RewardModel.offload / onload calls that moved something (any adapter)."""
    calls = {"offload": 0, "onload": 0}
    offload, onload = RewardModel.offload, RewardModel.onload

    def off(self):
        calls["offload"] += 1
        return offload(self)

    def on(self):
        calls["onload"] += self._offloaded  # an onload with the weights already there moves nothing
        return onload(self)

    monkeypatch.setattr(RewardModel, "offload", off)
    monkeypatch.setattr(RewardModel, "onload", on)
    _LOADED.clear()  # each run loads its own model
    yield calls
    _LOADED.clear()


@pytest.mark.parametrize("mode, moves", [("cpu", True), ("keep", False), ("auto", False)])
def test_collect_holds_or_offloads_the_reward_model(tmp_path, clip_folder, spy, mode, moves):
    """collect (2 groups of 2, one CLIP term and its gray variant: two model calls per group) with the model
    on the CPU: ``cpu`` offloads after each call and onloads before the next; ``keep`` and ``auto`` (no plan
    on a CPU) never move it."""
    args = ["collect", "--groups", "2", "-G", "2", "--out", str(tmp_path / "buf"), "--rewards", "clip=1,clip:gray=1",
            "--reward-path", f"clip={clip_folder}", "--reward-device", "cpu", "--reward-offload", mode]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert spy == ({"offload": 4, "onload": 3} if moves else {"offload": 0, "onload": 0})


def test_evaluate_offloads_the_reward_model(tmp_path, clip_folder, spy):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = ["evaluate", "--out", str(tmp_path / "ev"), "--rewards", "clip=1", "--reward-path", f"clip={clip_folder}",
            "--reward-device", "cpu", "--reward-offload", "cpu", "--seeds", "1", "--samples", "1",
            "--prompts", str(prompts)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert spy["offload"] >= 1 and spy["onload"] == spy["offload"] - 1


# ------------------------------------------------------------------------------- the pre-load check's rewards
def test_the_gpu_check_plans_the_reward_models_on_its_gpu(tmp_path, monkeypatch):
    import streamalign.rewards.plan  # noqa: F401  (registers the planners)

    assert sorted(REWARD_PLANNERS) == ["clip", "hpsv2", "hpsv3", "videoalign"]
    monkeypatch.delitem(REWARD_PLANNERS, "hpsv2")  # a model without a planner is left out (as plug-ins are)
    for name in ("va", "hps", "bright.py"):
        (tmp_path / name).touch()
    section = RewardSection(rewards="videoalign.VQ=1,hpsv2=1,bright=1", reward_offload="cpu",
                            reward_paths=f"videoalign={tmp_path / 'va'},hpsv2={tmp_path / 'hps'}",
                            reward_options="videoalign.base=/q,videoalign.batch_size=1,hpsv2.batch_size=4",
                            reward_plugins=f"bright={tmp_path / 'bright.py'}:make")  # fmt: skip
    got = planned_rewards(section, torch.device("cuda", 0))
    assert got == {"reward_offload": "cpu", "rewards": "videoalign.VQ=1,hpsv2=1,bright=1",
                   "reward_paths": {"videoalign": str(tmp_path / "va")},
                   "reward_options": {"videoalign.base": "/q", "videoalign.batch_size": "1"}}  # fmt: skip
    for device in ("cpu", "cuda:1"):  # the reward models run elsewhere: not on this GPU's plan
        other = section.model_copy(update={"reward_device": device})
        assert planned_rewards(other, torch.device("cuda", 0)) == {"reward_offload": "cpu"}
    assert planned_rewards(section.model_copy(update={"reward_device": "cuda"}), torch.device("cuda", 0)) == got
    assert planned_rewards(None, torch.device("cuda", 0)) == {}


def test_train_on_policy_offloads_the_reward_model(tmp_path, clip_folder, spy):
    """train --mode on, one iteration of one group of 2: its rollouts' scoring offloads the model."""
    args = ["train", "--mode", "on", "--steps", "1", "--batch-groups", "1", "-G", "2", "--updates-per-iter", "1",
            "--lora-rank", "4", "--threads", "1", "--rewards", "clip=1", "--reward-path", f"clip={clip_folder}",
            "--reward-device", "cpu", "--reward-offload", "cpu", "--out", str(tmp_path / "on")]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert spy == {"offload": 1, "onload": 0}  # one group scored once; the fresh model needed no onload
