"""`streamalign plan`: its numbers equal real allocations of the same code at reduced width (real tensors,
the live-storage tracker), depth extrapolation is exact, and `check_fits` refuses in one line naming the
settings that would fit (a GPU simulated by its memory, so this runs on a CPU)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.cli.flags import clear_errors
from streamalign.models.codec import WanVAECodec
from streamalign.models.kv_routing import eligible_starts
from streamalign.models.memory import LiveBytes, measure
from streamalign.models.routed_group import routed_group, routing_geometry
from streamalign.models.sampler import Sampler, Segment
from streamalign.pipeline import Pipeline
from streamalign.plan import (
    CUDA_RESERVE,
    DoesNotFitError,
    PlanContext,
    PlanRun,
    check_fits,
    encode_tokens,
    group_flops,
    plan,
    plan_stage,
)
from streamalign.train.config import TrainConfig
from streamalign.train.loop import Trainer
from streamalign.train.memory import SIMULATED, FixedText, simulated_entry, update_memory
from streamalign.train.plan import plan_train  # noqa: F401  (registers the train stage)

from .conftest import make_model, tiny_config

TEXT = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """A 4-layer generator config (dim 64, 8x8 latents, 2 chunks of 2 steps; its text encoder a tiny UMT5,
    its codec a tiny Wan VAE) as a YAML file, the architectures, and real modules with those architectures."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    # two denoising steps: fewer forwards to simulate, the same code
    cfg = tiny_config(frames=6, num_layers=4).with_overrides(sampler={"denoising_steps": [1000, 500]})
    path = tmp_path_factory.mktemp("plan") / "reduced.yaml"
    path.write_text(yaml.safe_dump({**cfg.model_dump(mode="json"), "name": "reduced"}))
    text_arch = UMT5Config(**TEXT)
    torch.manual_seed(0)
    codec = WanVAECodec(AutoencoderKLWan(**VAE))
    real = dict(model=make_model(cfg), text=UMT5EncoderModel(text_arch).eval(), codec=codec)
    # 2 layers, 1 chunk, the pixel codec (12 channels: 2x2 patches): the fork group holds the peak
    pixel = cfg.with_overrides(arch={**cfg.arch.model_dump(), "in_dim": 12, "out_dim": 12, "num_layers": 2},
                               latent={"channels": 12, "frames": 3}, codec={"kind": "pixel-unshuffle"})  # fmt: skip
    pixel_path = path.with_name("pixel.yaml")
    pixel_path.write_text(yaml.safe_dump({**pixel.model_dump(mode="json"), "name": "pixel"}))
    return cfg, str(path), text_arch, real, str(pixel_path)


def settings(path: str, **kw) -> PlanRun:
    base = dict(config=path, dtype="fp32", group_size=4, branch_batch=2, pivot=1, eval_batch=3)
    return PlanRun.build(**{**base, **kw})


def pixel_settings(path: str, **kw) -> PlanRun:
    return settings(path, **{"pivot": 0, "stages": ("collect",), **kw})


def test_plan_equals_real_allocations_at_reduced_width(reduced):
    """Every phase's peak (and FLOPs) from fake tensors, the generator's extrapolated from 1 and 2 layers,
    equals the tracker's count of the same calls on real tensors and real modules of 4 layers."""
    cfg, path, text_arch, real, _ = reduced
    run = settings(path)
    ctx = PlanContext(run, text_arch=text_arch, vae_arch=VAE)
    assert ctx.depths() == [1, 2] and ctx.depth == 4
    p = plan(run, ctx)
    model, text, codec = real["model"], real["text"], real["codec"]
    resident = [*model.parameters(), *model.buffers(), *text.parameters(), *codec.vae.parameters()]
    assert p.weights["text"] == sum(t.numel() * 4 for t in text.parameters())  # shared embedding once

    def real_peak(fn, *inputs):
        with torch.no_grad():
            return measure(fn, track=[*resident, *inputs], flops=True, tracker=LiveBytes(device="cpu"))[1]

    sampler = Sampler(model, cfg)
    a = cfg.arch
    one, three = torch.zeros(1, a.text_len, a.text_dim), torch.zeros(3, a.text_len, a.text_dim)
    z = torch.zeros(1, cfg.latent.frames, 16, cfg.latent.height, cfg.latent.width)
    collect, evaluate, generate = (p.stages[s].phases for s in ("collect", "evaluate", "generate"))
    bank = sampler.noise_bank
    expect = {
        "text": (collect[0], real_peak(lambda: encode_tokens(text, 1, a.text_len))),
        "fork group": (collect[1], real_peak(lambda: sampler.fork_group(one, bank(0), 1, 2, branch_batch=2), one)),
        "decode": (collect[2], real_peak(lambda: codec.decode(z, device="meta"), z)),
        "evaluate rollout": (evaluate[1], real_peak(lambda: sampler.rollout(three, bank([0, 1, 2])), three)),
        "generate rollout": (generate[1], real_peak(lambda: sampler.generate([Segment(one, 2)], bank([0])), one)),
    }
    for name, (phase, rep) in expect.items():
        assert phase.peak == rep.peak, name
    assert collect[2].flops == 4 * expect["decode"][1].flops  # G videos decoded one by one
    assert evaluate[1].flops == expect["evaluate rollout"][1].flops
    assert generate[1].flops == expect["generate rollout"][1].flops
    # a whole fork group's FLOPs (G = 4 in batches of 2) from the per-chunk FLOPs, at pivots 0 and 1
    chunks, cross = ctx.chunk_flops()
    for pivot in (0, 1):
        group = real_peak(lambda pv=pivot: sampler.fork_group(one, sampler.noise_bank(0), pv, 4, branch_batch=2), one)
        assert group_flops(chunks, cross, pivot, 4, 2) == group.flops > 0
    assert collect[1].flops == group_flops(chunks, cross, 1, 4, 2)


ROUTING = dict(fork="kv-routing", group_size=3, kv_history=3, m_nearest=3, perturb_blocks=1, perturb_first=8)


def test_routed_group_plan_equals_real_allocations_at_reduced_width(reduced, tmp_path):
    """--fork kv-routing: each routed-group phase (the whole group: prefix, rows one at a time, the unrouted
    replay) from fake tensors extrapolated from 1 and 2 layers equals the tracker's count of routed_group on
    real tensors of 4 layers, at the first and the last eligible start; the per-group FLOPs are the mean of
    the real FLOPs over every eligible start."""
    cfg, _, text_arch, real, _ = reduced
    # 5 chunks, a rolling window of 6 frames with 3 more ring slots: starts 2, 3 and 4 are eligible
    rcfg = cfg.with_overrides(latent={"frames": 15}, cache={"sink": 0, "window": 6})
    path = tmp_path / "routed.yaml"
    path.write_text(yaml.safe_dump({**rcfg.model_dump(mode="json"), "name": "routed"}))
    run = settings(str(path), pivot=None, stages=("collect",), **ROUTING)
    sp = plan_stage("collect", run, text_arch=text_arch, vae_arch=VAE)
    routed = [p for p in sp.phases if p.name.startswith("routed group")]
    assert [p.name for p in routed] == ["routed group p=2 (rows 1)", "routed group p=4 (rows 1)"]
    assert sp.notes["pivots"] == [2, 4]
    model, text, codec = real["model"], real["text"], real["codec"]
    resident = [*model.parameters(), *model.buffers(), *text.parameters(), *codec.vae.parameters()]
    sampler = Sampler(model, rcfg)
    geo = routing_geometry(rcfg, 3, 3, 1, 8)
    assert [e.chunk for e in eligible_starts(geo)] == [2, 3, 4]
    one = torch.zeros(1, cfg.arch.text_len, cfg.arch.text_dim)

    def real_group(start: int):
        with torch.no_grad():
            return measure(lambda: routed_group(sampler, one, sampler.noise_bank(0), 3, geo, start),
                           track=[*resident, one], flops=True, tracker=LiveBytes(device="cpu"))[1]  # fmt: skip

    reps = {p: real_group(p) for p in (2, 3, 4)}
    for phase, start in zip(routed, (2, 4), strict=True):
        assert (phase.peak, phase.flops) == (reps[start].peak, reps[start].flops), start
    text_flops, decode_flops = sp.phases[0].flops, sp.phases[len(routed) + 1].flops
    assert sp.flops - text_flops - decode_flops == sum(r.flops for r in reps.values()) // 3  # affine in the start
    # a fixed --pivot plans that start alone; an ineligible one is refused as collect refuses it
    fixed = plan_stage("collect", run.replace(pivot=3), text_arch=text_arch, vae_arch=VAE, flops=False)
    assert [p.peak for p in fixed.phases if p.name.startswith("routed")] == [reps[3].peak]
    with pytest.raises(ValueError, match="--pivot 1 cannot start"):
        plan_stage("collect", run.replace(pivot=1), text_arch=text_arch, vae_arch=VAE, flops=False)


def test_check_fits_refuses_in_one_line_naming_what_fits(reduced):
    """A branch batch too large for the (simulated) GPU: check_fits refuses in one line naming the batch the
    stage would choose from that memory (re-planned: it fits); nothing fits: the memory needed; a CPU
    device is a no-op."""
    _, _, text_arch, _, path = reduced
    parts = dict(text_arch=text_arch, flops=False)
    big = plan_stage("collect", pixel_settings(path, branch_batch=4), **parts)  # every branch at once
    one = plan_stage("collect", pixel_settings(path, branch_batch=1), **parts)
    memory = CUDA_RESERVE + (big.peak + one.peak) // 2  # one branch fits, four do not
    assert check_fits("collect", pixel_settings(path, branch_batch=4), "cpu") is None  # no GPU: nothing to check
    with pytest.raises(DoesNotFitError) as e:
        check_fits("collect", pixel_settings(path, branch_batch=4), "cpu", total_memory=memory, **parts)
    line = str(e.value)
    assert "\n" not in line and line.startswith("collect will not fit on cpu") and "--branch-batch 4" in line
    m = re.search(r"fits: --dtype fp32 -G 4 --branch-batch (\d+)", line)  # what the auto batch picked
    assert m and 1 <= int(m.group(1)) < 4
    fitting = plan_stage("collect", pixel_settings(path, branch_batch=int(m.group(1))), **parts)
    assert fitting.fits(memory)
    tiny = CUDA_RESERVE + one.peak // 2  # not even the weights and one branch
    with pytest.raises(DoesNotFitError, match="no batch size or dtype fits: use a GPU with at least"):
        check_fits("collect", pixel_settings(path, branch_batch=None), "cpu", total_memory=tiny, **parts)

    @clear_errors
    def stage():  # what a stage's command makes of the refusal: one line on stderr, exit code 2
        raise e.value

    with pytest.raises(typer.Exit) as ex:
        stage()
    assert ex.value.exit_code == 2


def test_plan_command_prints_a_table_and_json():
    args = ["plan", "-c", "shapes", "--frames", "3", "--stages", "generate", "--json", "--gpu", "a100"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    gen = out["stages"]["generate"]
    assert out["gpu"]["peak_tflops"] == 312.0 and gen["fits"] and gen["peak"] > out["weights"]["generator"]
    assert [p["name"].split()[0] for p in gen["phases"]] == ["text", "rollout", "decode"]
    assert gen["seconds_per_unit"] == pytest.approx(gen["flops"] / (312e12 * 0.4))
    r = CliRunner().invoke(app, ["plan", "-c", "tiny", "--stages", "generate"])
    assert r.exit_code == 2 and "text encoder" in r.output and len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["plan", "--stages", "nope,collect"])
    assert r.exit_code == 2 and "--stages" in r.output


@pytest.mark.slow
def test_depth_extrapolation_is_exact_at_full_width():
    """wan-1.3b at full width (2 chunks of 480x832 latents): the extrapolated plan equals all 30 layers run."""
    kw = dict(config="wan-1.3b", frames=6, group_size=2, branch_batch=2, pivot=1, eval_batch=2,
              stages=("collect", "evaluate"))  # fmt: skip
    fast, full = plan(PlanRun.build(**kw)), plan(PlanRun.build(**kw, full_depth=True))
    for s in fast.stages:
        assert [(p.peak, p.flops) for p in fast.stages[s].phases] == [(p.peak, p.flops) for p in full.stages[s].phases]


def test_train_stage_equals_a_real_update(reduced):
    """The train stage's update phase: one real Trainer.update (CoPO, micro-batches of 3 rows, bf16 autocast
    and checkpointing as on CUDA) planned in the steady state equals a real trainer's second update (AdamW's
    moments held, the old policy's predictions recomputed) on real tensors of the same architecture (2
    layers, the pixel codec), tracked, plus the text encoder the stage holds: the same peak and FLOPs."""
    cfg, _, text_arch, real, path = reduced
    run = pixel_settings(path, stages=("train",), replay_batch=3)
    p = plan(run, PlanContext(run, text_arch=text_arch))
    cfg = p.config
    sp = p.stages["train"]
    assert [ph.name.split()[0] for ph in sp.phases] == ["text", "update"] and sp.notes["pivots"] == [0]
    phase = sp.phases[1]
    real_settings = TrainConfig(buffer=SIMULATED, objective="copo", replay_batch=3, device="cpu", autocast="bf16",
                                checkpointing="on")  # fmt: skip
    text = torch.zeros(1, cfg.arch.text_len, cfg.arch.text_dim)
    model = make_model(cfg).requires_grad_(False)  # fp32 weights, as --dtype fp32
    trainer = Trainer(real_settings, pipeline=Pipeline(cfg, model, FixedText(text), None, SIMULATED))
    entry = simulated_entry(cfg, 0, 4, trainer.objective.fork)
    trainer.update(0, [entry], 1)  # the plan's case is the steady state: the second update (moments, old forward)
    update = update_memory(trainer, entry, text, flops=True, step=1)
    held = sum(t.untyped_storage().nbytes() for t in real["text"].parameters())  # the text encoder stays
    assert p.text_kept and phase.batch == trainer.replay.last_batch == 3
    assert phase.peak == update.peak + held and phase.flops == update.flops > 0
    assert sp.notes["objective"] == "copo" and sp.notes["checkpointing"] and sp.notes["autocast"] == "bf16"
    assert sp.flops == sp.phases[0].flops + phase.flops and sp.units == 100 * 8  # 100 updates of 8 groups


def test_train_stage_sizes_its_replay_batch_from_the_gpu_and_refuses_in_one_line(reduced):
    """--replay-batch not given: the replay batch the memory of the (simulated) GPU allows, as on CUDA; a
    given one too large: check_fits refuses in one line naming the replay batch that fits."""
    _, _, text_arch, _, path = reduced
    parts = dict(text_arch=text_arch, flops=False)
    kw = dict(stages=("train",), height=64, width=64)  # 32x32 latents: the rows' activations dominate
    every = plan_stage("train", pixel_settings(path, **kw), **parts)  # a large GPU: every row at once
    four = plan_stage("train", pixel_settings(path, replay_batch=4, **kw), **parts)
    assert every.phases[1].batch == 8 and every.peak > four.peak  # CoPO: 4 anchors x 2 steps
    memory = CUDA_RESERVE + (every.peak + four.peak) // 2
    auto = plan_stage("train", pixel_settings(path, gpu_memory=memory / 2**30, **kw), **parts)
    rb = auto.phases[1].batch
    assert 1 <= rb < 8 and auto.fits(memory)
    with pytest.raises(DoesNotFitError) as e:
        check_fits("train", pixel_settings(path, replay_batch=8, **kw), "cpu", total_memory=memory, **parts)
    line = str(e.value)
    assert "\n" not in line and line.startswith("train will not fit on cpu") and "--replay-batch 8" in line
    assert f"fits: --dtype fp32 -G 4 --replay-batch {rb} " in line


def test_plan_command_reports_the_train_stage():
    args = ["plan", "-c", "shapes", "--stages", "train", "--pivot", "1", "--objective", "nft", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    train = json.loads(r.output)["stages"]["train"]
    assert train["fits"] and train["objective"] == "nft" and train["replay_batch"] == {"1": 12}  # 12 branches
    assert [p["name"].split()[0] for p in train["phases"]] == ["text", "update"] and train["flops"] > 0


@pytest.mark.slow
def test_train_stage_at_full_size():
    """wan-1.3b, 480x832, 81 frames, on an H100: the default CoPO update fits, at both planned pivots."""
    p = plan(PlanRun.build(config="wan-1.3b", stages=("train",)))
    sp = p.stages["train"]
    print(p.table())
    assert sp.fits(p.run.memory) and sp.notes["pivots"] == [0, 6] and sp.peak <= 40 * 2**30
    assert all(ph.batch == 16 for ph in sp.phases[1:])
