"""--device / --dtype on every model stage: weights straight into the target dtype (never a float32 copy),
bf16 end to end on the CPU (collect, generate, evaluate), buffer latents in the store dtype (bit-exact in
both shard formats, recorded in the manifest, bytes in `buffer info`), training from a bf16 buffer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from streamalign.buffer.formats import get_format
from streamalign.buffer.inspect import buffer_info
from streamalign.buffer.manifest import read_manifest
from streamalign.cli import STAGES, app
from streamalign.collect.collector import CollectConfig, collect
from streamalign.models.checkpoint import load_generator
from streamalign.models.memory import LiveBytes
from streamalign.models.placement import Placement, resolve_dtype
from streamalign.pipeline import Pipeline
from streamalign.schemas.run import leaf_paths
from streamalign.schemas.sections import Hardware
from streamalign.train.config import TrainConfig
from streamalign.worlds.shapes import held_in_prompts

from .conftest import make_model, tiny_config

run = CliRunner().invoke
PROMPTS = tuple(p.text for p in held_in_prompts()[::60])
MODEL_STAGES = {"collect", "evaluate", "merge", "demo", "noise-sources", "objectives", "check"}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_every_model_stage_has_the_one_hardware_section():
    configs = {name: cfg for _, name, cfg, *_ in STAGES if name in MODEL_STAGES}
    from streamalign.generate.run import GenerateRun

    configs.update(generate=GenerateRun, train=TrainConfig)
    assert set(configs) == MODEL_STAGES | {"generate", "train"}
    for name, cfg in configs.items():
        paths = leaf_paths(cfg)
        assert {k: paths[k] for k in ("device", "dtype", "text_offload")} == {
            "device": ("hardware", "device"), "dtype": ("hardware", "dtype"),
            "text_offload": ("hardware", "text_offload")}, name  # fmt: skip
        assert issubclass(cfg.model_fields["hardware"].annotation, Hardware), name


def test_auto_is_fp32_on_cpu_and_bf16_on_cuda():
    assert Placement.of(Hardware()) == Placement(torch.device("cpu"), torch.float32, "auto")
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16 and resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda"):
        Hardware(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_line(tmp_path):
    r = run(app, ["collect", "--out", str(tmp_path / "b"), "--device", "cuda", "--groups", "1"])
    assert r.exit_code == 2 and "CUDA is not available" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
    r = run(app, ["generate", "x", "--out", str(tmp_path / "g"), "--dtype", "fp64"])
    assert r.exit_code == 2 and "--dtype" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_loading_into_bf16_never_holds_a_float32_copy(tmp_path):
    """A float32 .safetensors checkpoint loaded as bf16: peak live bytes (every storage an aten op creates,
    the file's tensors included) stay near the bf16 model plus ONE float32 tensor; building float32
    parameters first (the old path) would need the whole float32 model."""
    cfg = tiny_config(dim=64, ffn_dim=128, num_heads=4, num_layers=6)
    sd = {k: v.contiguous() for k, v in make_model(cfg).state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    fp32 = sum(v.nbytes for v in sd.values())
    largest = max(v.nbytes for v in sd.values())
    with LiveBytes() as live:
        model = load_generator(cfg, tmp_path / "w.safetensors", dtype=torch.bfloat16)
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16} and {p.device.type for p in params} == {"cpu"}
    bf16 = sum(p.numel() * 2 for p in params)
    assert bf16 * 2 == fp32 and largest < fp32 / 8
    assert live.peak <= bf16 + largest + largest // 2, (live.peak, bf16, fp32)
    for k, v in model.state_dict().items():  # each weight is its stored value rounded once
        assert torch.equal(bits(v), bits(sd[k].to(torch.bfloat16))), k
    sd_bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    save_file(sd_bf16, str(tmp_path / "b.safetensors"))
    kept = load_generator(cfg, tmp_path / "b.safetensors", dtype=torch.bfloat16)
    w = next(kept.parameters())
    w.data.add_(1)  # parameters own their memory: the (memory-mapped) file is untouched
    assert torch.equal(load_generator(cfg, tmp_path / "b.safetensors", dtype=None).state_dict()[
        next(iter(kept.state_dict()))], sd_bf16[next(iter(kept.state_dict()))])  # fmt: skip


def test_lora_merges_into_the_stored_weight_before_the_cast(tmp_path):
    """bf16(W + delta), not bf16(bf16(W) + delta): the same numbers as merging in float32, then casting."""
    from streamalign.adapters.lora import LoraSettings, attach_lora, save_lora

    cfg = tiny_config()
    base = make_model(cfg)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "w.safetensors"))
    peft = attach_lora(make_model(cfg), LoraSettings(4, 8.0), seed=3)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_lora(peft, tmp_path / "adapter")
    want = load_generator(cfg, tmp_path / "w.safetensors", lora=tmp_path / "adapter").to(torch.bfloat16)
    got = load_generator(cfg, tmp_path / "w.safetensors", lora=tmp_path / "adapter", dtype=torch.bfloat16)
    ws, gs = want.state_dict(), got.state_dict()
    assert all(torch.equal(bits(ws[k]), bits(gs[k])) for k in ws)


@pytest.fixture(scope="module")
def bf16_policy():
    return Pipeline.load("shapes", placement=Placement(dtype=torch.bfloat16))


@pytest.fixture(scope="module")
def fp32_policy():
    return Pipeline.load("shapes")


def test_bf16_pipeline_computes_in_bf16(bf16_policy):
    assert {p.dtype for p in bf16_policy.model.parameters()} == {torch.bfloat16}
    assert bf16_policy.sampler.new_cache(1).k[0].dtype == torch.bfloat16  # the KV cache in the compute dtype
    assert bf16_policy.placement.dtype == torch.bfloat16


def _entries(folder, fmt):
    return [e for p in sorted(folder.glob("shard-*")) for e in get_format(fmt).read(p)]


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_store_dtype_bf16_round_trips_bit_exactly(tmp_path, fp32_policy, fmt):
    """fp32 compute, bf16 store: every stored latent is the fp32 rollout's value rounded once, read back
    with the same bits in both shard formats; the manifest and `buffer info` say bfloat16 and half the bytes."""
    base = CollectConfig(prompts=PROMPTS, groups=2, group_size=2, entries_per_shard=2, seed=3, format=fmt)
    collect(fp32_policy, base, tmp_path / "f32", progress=False)
    collect(fp32_policy, base.model_copy(update={"store_dtype": "bf16"}), tmp_path / "bf16", progress=False)
    for a, b in zip(_entries(tmp_path / "f32", fmt), _entries(tmp_path / "bf16", fmt), strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
        for name, t in a.tensors().items():
            assert torch.equal(bits(t.to(torch.bfloat16)), bits(getattr(b, name))), name
        assert all(torch.equal(a.rewards[k], b.rewards[k]) for k in a.rewards)  # the scores are the same
    assert set(read_manifest(tmp_path / "bf16").column("store_dtype").to_pylist()) == {"bfloat16"}
    i32, i16 = buffer_info(tmp_path / "f32"), buffer_info(tmp_path / "bf16")
    assert i32["store_dtypes"] == {"float32": 2} and i16["store_dtypes"] == {"bfloat16": 2}
    assert i16["entry_bytes"]["x0_old"] * 2 == i32["entry_bytes"]["x0_old"]
    assert i16["entry_bytes"]["reward"] == i32["entry_bytes"]["reward"]  # rewards stay float32


def test_bf16_end_to_end_on_cpu(tmp_path):
    """collect, generate and evaluate with --dtype bf16 on the CPU (the CUDA default's code path)."""
    r = run(app, ["collect", "--out", str(tmp_path / "buf"), "--dtype", "bf16", "--groups", "1", "-G", "2",
                  "--prompts", str(_prompt_file(tmp_path))])  # fmt: skip
    assert r.exit_code == 0, r.output
    (entry,) = _entries(tmp_path / "buf", "webdataset")
    assert entry.dtype == torch.bfloat16  # auto store dtype = the compute dtype
    rows = read_manifest(tmp_path / "buf").to_pylist()
    assert {r["store_dtype"] for r in rows} == {"bfloat16"} and {r["text_hash"] for r in rows} == {entry.text_hash}
    r = run(app, ["generate", PROMPTS[0], "--out", str(tmp_path / "gen"), "--dtype", "bf16"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "gen" / "0000.mp4").stat().st_size > 0
    r = run(app, ["evaluate", "--out", str(tmp_path / "ev"), "--dtype", "bf16", "--seeds", "1", "--samples", "1",
                  "--n-boot", "10", "--prompts", str(_prompt_file(tmp_path))])  # fmt: skip
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["pairs"] == 1 and 0 <= report["models"]["base"]["means"]["composite"] <= 10
    run_yaml = (tmp_path / "ev" / "run.yaml").read_text()
    assert "dtype: bf16" in run_yaml


def _prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text(PROMPTS[0] + "\n")
    return p


def test_training_reads_bf16_latents_as_float32(tmp_path, fp32_policy):
    """An update on a bf16 entry equals the update on the same values held in float32 (the reader casts)."""
    from streamalign.train.loop import Trainer

    cfg = CollectConfig(prompts=PROMPTS, groups=1, group_size=3, seed=5, pivot="1", store_dtype="bf16")
    collect(fp32_policy, cfg, tmp_path / "buf", progress=False)
    (e16,) = _entries(tmp_path / "buf", "webdataset")
    # stored old predictions on both (auto recomputes them for bf16 entries: tests/test_first_update_ratio.py)
    trainer = Trainer(TrainConfig(mode="semi", buffer=str(tmp_path / "buf"), lora_rank=4, lora_alpha=4.0,
                                  old_predictions="stored"))  # fmt: skip
    params = trainer.params

    def grads(entry):
        trainer.update(0, [entry], 1, apply=False)
        return [p.grad.clone() for p in params]

    g16, g32 = grads(e16), grads(e16.cast(torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(g16, g32, strict=True)) and any(a.abs().sum() > 0 for a in g16)


def test_training_warns_when_the_prompt_encodes_differently(tmp_path, fp32_policy, caplog):
    """Entries carry the hash of the prompt embedding they were rolled out with; a trainer that encodes the
    prompt to other bytes (another encoder, dtype or device) says so."""
    import dataclasses

    from streamalign.train.loop import Trainer

    collect(fp32_policy, CollectConfig(prompts=PROMPTS, groups=1, group_size=2), tmp_path / "buf", progress=False)
    (entry,) = _entries(tmp_path / "buf", "webdataset")
    assert entry.text_hash == fp32_policy.text.embedding_hash(entry.prompt)
    trainer = Trainer(TrainConfig(mode="semi", buffer=str(tmp_path / "buf"), lora_rank=4, lora_alpha=4.0))
    trainer.check_entry(entry)
    assert trainer.text_mismatches == 0 and not caplog.records
    with caplog.at_level("WARNING", logger="streamalign.train"):
        trainer.check_entry(dataclasses.replace(entry, text_hash="0" * 16))
        trainer.check_entry(dataclasses.replace(entry, text_hash="1" * 16))
    assert trainer.text_mismatches == 2 and len(caplog.records) == 1  # said once, counted always
    assert "differ from this run's" in caplog.records[0].getMessage()
