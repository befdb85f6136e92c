"""Reward models in the plan (issue 28 item 1): VideoAlign planned from its configs alone on fake tensors
equals the real adapter's tracked memory at reduced width (a tiny Qwen2-VL built in code): the same
weight bytes, and the same peak of one scoring batch; a plan with a reward model counts its weights
beside the generator's and sizes the branch batches with them held."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from streamalign.models.memory import GiB, LiveBytes, measure, storage_bytes
from streamalign.models.placement import Placement
from streamalign.pipeline import resolve_config
from streamalign.plan import (
    CUDA_RESERVE,
    DoesNotFitError,
    PlanContext,
    PlanRun,
    check_stage,
    plan_stage,
    stage_reward_hold,
)
from streamalign.rewards.models.videoalign import VideoAlignReward
from streamalign.rewards.plan import plan_videoalign
from streamalign.schemas.sections import RewardSection
from tests.test_reward_models import save_videoalign


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("videoalign")
    save_videoalign(path)
    return path


def config_only(folder, to):
    """The folder without weights or tokenizer: model_config.json and the Qwen2-VL config.json."""
    to.mkdir()
    for name in ("model_config.json", "config.json"):
        shutil.copy(folder / name, to / name)
    return to


class DeviceBytes(LiveBytes):
    """LiveBytes of the real run without the input videos' storage (on a GPU they wait on the host), and the
    bytes of the integer / boolean tensors it creates (token ids, masks, frame and patch indices: the plan
    computes them on the host, real, so it does not count them)."""

    def __init__(self, host: torch.Tensor) -> None:
        super().__init__(device="cpu")
        self.host = host.untyped_storage().data_ptr()
        self.index_bytes = 0

    def _add(self, t: torch.Tensor) -> None:
        if t.untyped_storage().data_ptr() == self.host:
            return
        before = self.current
        super()._add(t)
        if t.dtype in (torch.int64, torch.int32, torch.bool):
            self.index_bytes += self.current - before


def test_planned_videoalign_equals_the_real_tracked_peak(folder, tmp_path):
    torch.manual_seed(0)
    videos = (torch.rand(2, 20, 3, 56, 84) * 255).to(torch.uint8)  # uint8 levels, as collect keeps them
    real = VideoAlignReward(folder, device="cpu", dtype="float32")
    weights = [*real.net.parameters(), *real.net.buffers()]
    prompt = "a red square moves left"
    tracker = DeviceBytes(videos)
    _, rep = measure(lambda: real._score(videos, [prompt, prompt], 16.0), track=weights, tracker=tracker)
    text_tokens = len(real.tokenizer(real.prompt(prompt))["input_ids"]) - 1  # all but the one <|video_pad|>

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    planned = plan_videoalign(str(config_only(folder, tmp_path / "cfg")), {"plan_text_tokens": text_tokens},
                              torch.float32, mode)  # fmt: skip
    assert storage_bytes(planned.weights) == storage_bytes(weights) and planned.batch == real.batch_size
    with mode:
        fake = torch.zeros(2, 20, 3, 56, 84, dtype=torch.uint8, device="meta")
    with mode, torch.no_grad():
        _, planned_rep = measure(lambda: planned.score(fake), track=planned.weights, tracker=LiveBytes(device="cpu"))
    # equal but for the host-side index tensors (here 0.2% of the peak; at full size a few hundred KB of GBs)
    assert tracker.index_bytes < 0.01 * rep.peak
    assert rep.peak - tracker.index_bytes <= planned_rep.peak <= rep.peak, (planned_rep.peak, rep.peak)


@pytest.mark.slow
def test_a_plan_counts_the_reward_model_and_batches_with_it(folder, tmp_path):
    """Three shapes plans (~1 min each on 2 loaded cores): a large-vocabulary VideoAlign config held beside
    the generator leaves the branch batches less memory; offloaded, the fork phases do not hold it."""
    cfg = config_only(folder, tmp_path / "cfg")
    data = json.loads((cfg / "config.json").read_text())
    data["text_config"]["vocab_size"] = 200_000  # ~26 MB of fp32 embeddings: comparable to the branch batches
    (cfg / "config.json").write_text(json.dumps(data))
    common = dict(config="shapes", dtype="fp32", stages=("collect",), gpu_memory=1.02, full_depth=True)
    bare = plan_stage("collect", PlanRun.build(**common), flops=False)
    run = PlanRun.build(**common, rewards="videoalign.VQ=1,videoalign.MQ:gray=1",
                        reward_paths={"videoalign": str(cfg)}, reward_offload="keep")  # fmt: skip
    kept = plan_stage("collect", run, flops=False)
    off = plan_stage("collect", run.replace(reward_offload="cpu"), flops=False)
    rm = PlanContext(run, flops=False).weights()["reward:videoalign"]
    assert rm > 20e6 and kept.notes["rewards_kept"] and not off.notes["rewards_kept"]
    assert any(p.name.startswith("score videoalign (2 videos)") for p in kept.phases)
    bb_bare, bb_kept = bare.notes["branch_batch"], kept.notes["branch_batch"]
    assert all(bb_kept[p] <= bb_bare[p] for p in bb_bare) and any(bb_kept[p] < bb_bare[p] for p in bb_bare)
    assert off.notes["branch_batch"] == bb_bare  # offloaded: the forks have the memory they had without it
    forks = [p for p in kept.phases if p.name.startswith("fork")]
    assert all(p.peak > rm for p in forks)  # the held reward weights are in every fork phase's peak
    score_kept = next(p for p in kept.phases if p.name.startswith("score"))
    score_off = next(p for p in off.phases if p.name.startswith("score"))
    assert score_kept.peak == score_off.peak  # one reward model: scoring holds the same either way


def _section(cfg, **kw) -> RewardSection:
    return RewardSection(rewards="videoalign.VQ=1,videoalign.MQ:gray=1", reward_paths=f"videoalign={cfg}",
                         reward_options="videoalign.num_frames=2,videoalign.batch_size=1,"
                                        "videoalign.plan_text_tokens=8", **kw)  # fmt: skip


def test_the_gpu_check_plans_the_rewards_and_batches_with_them_held(folder, tmp_path):
    """check_stage (collect at pivot 0, shapes, a simulated 1 GiB + 40 MiB GPU) with the reward section: the
    reward weights (a 200k-token vocabulary: 26 MB, comparable to the branch batches) are in every phase, the
    branch batch it picks is smaller than without them and fits with them, where the one without would not."""
    cfg = config_only(folder, tmp_path / "cfg")
    data = json.loads((cfg / "config.json").read_text())
    vocab, width = data["text_config"]["vocab_size"], data["text_config"]["hidden_size"]
    data["text_config"]["vocab_size"] = 200_000
    (cfg / "config.json").write_text(json.dumps(data))
    real = VideoAlignReward(folder, device="cpu", dtype="float32")
    weights = storage_bytes([*real.net.parameters(), *real.net.buffers()]) + (200_000 - vocab) * width * 4
    memory = GiB + 40 * 2**20
    model, gpu = resolve_config("shapes", None), Placement(torch.device("cuda", 0), torch.float32, "auto")
    bare = check_stage("collect", model, gpu, None, memory, group_size=12, pivot=0)
    kept = check_stage("collect", model, gpu, _section(cfg), memory, group_size=12, pivot=0)
    assert kept.notes["rewards_kept"] and stage_reward_hold("auto", kept) == "keep" and "rewards_kept" not in bare.notes
    by_name = {p.name: p.peak for p in bare.phases}
    for p in kept.phases:  # phases that do not depend on the batch: the reward weights added, exactly
        if p.name.startswith(("text", "decode")):
            assert p.peak - by_name[p.name] == weights, p.name
    bb_bare, bb_kept = bare.notes["branch_batch"], kept.notes["branch_batch"]
    assert all(bb_kept[p] < bb_bare[p] for p in bb_bare), (bb_bare, bb_kept)
    assert kept.fits(memory)
    forks = [p for p in bare.phases if p.name.startswith("fork")]
    assert max(p.peak for p in forks) + weights + CUDA_RESERVE > memory  # the batches picked without would not fit


@pytest.mark.slow
def test_the_gpu_check_offloads_when_the_rewards_do_not_fit_kept():
    """wan-1.3b collect on a simulated 16 GiB GPU with Qwen2-VL-2B's VideoAlign (config-only, ~1 min): held,
    the text phase alone (UMT5 offloaded after it, 10.6 GiB) plus the reward weights exceed the GPU, so auto
    offloads them; offloaded the stage fits."""
    from bench.bench_plan_rewards import config_folder

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_folder(Path(tmp) / "videoalign")
        section = RewardSection(rewards="videoalign.VQ=1", reward_paths=f"videoalign={cfg}")
        model, gpu = resolve_config("wan-1.3b", None), Placement(torch.device("cuda", 0), torch.bfloat16, "auto")
        sp = check_stage("collect", model, gpu, section, 16 * GiB, group_size=12, pivot=6)
        assert sp.notes["rewards_kept"] is False and stage_reward_hold("auto", sp) == "cpu" and sp.fits(16 * GiB)
        with pytest.raises(DoesNotFitError, match="collect will not fit"):
            check_stage("collect", model, gpu, section.model_copy(update={"reward_offload": "keep"}), 16 * GiB,
                        group_size=12, pivot=6)  # fmt: skip


@pytest.fixture(scope="module")
def hpsv3_folder(tmp_path_factory):
    from tests.test_reward_models import hpsv3

    return hpsv3.__wrapped__(tmp_path_factory)[0]  # the HPSv3 layout of tests/test_reward_models.py


@pytest.mark.parametrize("resample", ["uint8", "pil"])
def test_planned_hpsv3_equals_the_real_tracked_peak(hpsv3_folder, tmp_path, resample):
    """HPSv3 (Qwen2-VL + the RankNet head in fp32) planned from its base config.json and tokenizer (no weights):
    the real adapter's weight bytes, and its peak for one scoring batch of 3 frames, but the host-side index
    tensors (0.7% of this tiny peak). ``pil`` resizes on the host: planned as the uint8 path (one frame's
    temporaries apart, within 1%; here the peak lies in the network and both are equal)."""
    from streamalign.rewards.models import load_reward_model
    from streamalign.rewards.plan import plan_hpsv3
    from streamalign.rewards.registry import as_float

    torch.manual_seed(0)
    frames = as_float((torch.rand(3, 3, 56, 84) * 255).to(torch.uint8))  # what frame_scores hands _frame_scores
    real = load_reward_model("hpsv3", hpsv3_folder, device="cpu", dtype="float32", batch_size=3, resample=resample)
    weights = [*real.net.parameters(), *real.net.buffers()]
    prompt = "a red square moves left"
    tracker = DeviceBytes(torch.zeros(1))
    # the frames tracked as the device copy the adapter makes of them on a GPU (on the CPU .to() is a no-op)
    _, rep = measure(lambda: real._frame_scores(frames, [prompt] * 3), track=[*weights, frames], tracker=tracker)
    text_tokens = len(real.tokenizer(real.prompt(prompt))["input_ids"]) - 1  # all but the one <|image_pad|>

    cfg = tmp_path / "cfg"
    cfg.mkdir()
    for f in hpsv3_folder.iterdir():  # the base folder without HPSv3.safetensors: config.json + tokenizer
        if f.name != "HPSv3.safetensors":
            shutil.copy(f, cfg / f.name)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    opts = {"plan_text_tokens": text_tokens, "batch_size": 3, "resample": resample}
    planned = plan_hpsv3(str(cfg), opts, torch.float32, mode)
    assert storage_bytes(planned.weights) == storage_bytes(weights)
    with mode:
        fake = torch.zeros(1, 4, 3, 56, 84, dtype=torch.uint8, device="meta")  # one video; its first 3 frames
    with mode, torch.no_grad():
        _, planned_rep = measure(lambda: planned.score(fake), track=planned.weights, tracker=LiveBytes(device="cpu"))
    assert tracker.index_bytes < 0.01 * rep.peak
    if resample == "uint8":
        assert rep.peak - tracker.index_bytes <= planned_rep.peak <= rep.peak, (planned_rep.peak, rep.peak)
    else:
        assert abs(planned_rep.peak - rep.peak) <= 0.01 * rep.peak, (planned_rep.peak, rep.peak)
    # without the tokenizer: the config's vocabulary (the reference adds <|Reward|>: one row more)
    for f in cfg.iterdir():
        if f.name != "config.json":
            f.unlink()
    bare = plan_hpsv3(str(cfg), opts, torch.float32, FakeTensorMode(allow_non_fake_inputs=True))
    width = json.loads((cfg / "config.json").read_text())["text_config"]["hidden_size"]
    assert storage_bytes(weights) - storage_bytes(bare.weights) == width * 4


def _frame_peaks(real, planned, frames: torch.Tensor, prompt: str) -> tuple[int, int, int]:
    """(real tracked peak, its index-tensor bytes, planned peak) of one scoring batch of `frames` (float32, as
    frame_scores hands them over). They wait on the host (not tracked); on a GPU the adapter's
    ``frames.to(device).float()`` makes a float32 copy, which on the CPU only a float64 input makes."""
    weights = [*real.net.parameters(), *real.net.buffers()]
    host = frames.double()
    tracker = DeviceBytes(host)
    n = frames.shape[0]
    _, rep = measure(lambda: real._frame_scores(host, [prompt] * n), track=weights, tracker=tracker)
    assert storage_bytes(planned.weights) == storage_bytes(weights)
    mode = planned.weights[0].fake_mode
    with mode:
        fake = torch.zeros(1, n, *frames.shape[1:], dtype=torch.uint8, device="meta")
    with mode, torch.no_grad():
        _, planned_rep = measure(lambda: planned.score(fake), track=planned.weights, tracker=LiveBytes(device="cpu"))
    return rep.peak, tracker.index_bytes, planned_rep.peak


def test_planned_hpsv2_and_clip_equal_the_real_tracked_peaks(tmp_path):
    """HPSv2.1 (open_clip_config.json alone) and CLIP (config.json alone) planned without weights or tokenizer:
    the real adapters' weight bytes and, but the host-side index tensors, their peaks for one batch of 4
    frames."""
    from streamalign.rewards.models import load_reward_model
    from streamalign.rewards.plan import plan_clip, plan_hpsv2
    from tests.test_reward_models import save_hpsv2
    from tests.test_rewards import _tiny_clip

    clip = tmp_path / "clip"
    clip.mkdir()
    _tiny_clip(clip)
    hps = tmp_path / "hps"
    (hps / "tokenizer").mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(clip / name, hps / "tokenizer" / name)
    save_hpsv2(hps, len(json.loads((clip / "vocab.json").read_text())))
    frames = torch.rand(4, 3, 40, 60, generator=torch.Generator().manual_seed(3))
    prompt = "a red circle"

    real = load_reward_model("hpsv2", hps, device="cpu", dtype="float32", batch_size=4)
    only = tmp_path / "hps-cfg"
    only.mkdir()
    shutil.copy(hps / "open_clip_config.json", only / "open_clip_config.json")
    planned = plan_hpsv2(str(only), {"batch_size": 4}, torch.float32, FakeTensorMode(allow_non_fake_inputs=True))
    peak, index, plan_peak = _frame_peaks(real, planned, frames, prompt)
    assert index < 0.01 * peak and peak - index <= plan_peak <= peak, (plan_peak, peak, index)

    real = load_reward_model("clip", clip, device="cpu", dtype="float32", batch_size=4)
    tokens = len(real.tokenizer([prompt])["input_ids"][0])
    only = tmp_path / "clip-cfg"
    only.mkdir()
    shutil.copy(clip / "config.json", only / "config.json")
    planned = plan_clip(str(only), {"batch_size": 4, "plan_text_tokens": tokens}, torch.float32,
                        FakeTensorMode(allow_non_fake_inputs=True))  # fmt: skip
    peak, index, plan_peak = _frame_peaks(real, planned, frames, prompt)
    assert index < 0.01 * peak and peak - index <= plan_peak <= peak, (plan_peak, peak, index)
