"""Checkpoint layouts, strict loading, LoRA merging and the `streamalign model` CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from streamalign.models.checkpoint import CheckpointError, load_generator, merge_lora, read_state_dict

from .conftest import make_model, tiny_config


@pytest.fixture
def model_and_cfg():
    cfg = tiny_config()
    return make_model(cfg, seed=4), cfg


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def wrap_keys(sd, fn):
    return {fn(k): v.clone() for k, v in sd.items()}


LAYOUTS = {
    "self_forcing": lambda sd: {
        "generator": wrap_keys(sd, lambda k: "model." + k),
        "generator_ema": wrap_keys(sd, lambda k: "model." + k),
    },
    "fsdp": lambda sd: {
        "generator": wrap_keys(
            sd,
            lambda k: "model._fsdp_wrapped_module." + k.replace("self_attn", "_checkpoint_wrapped_module.self_attn"),
        )
    },
    "compiled": lambda sd: wrap_keys(sd, lambda k: "_orig_mod." + k),
    "diffusion_model": lambda sd: {"model": wrap_keys(sd, lambda k: "diffusion_model." + k)},
    "bare": lambda sd: wrap_keys(sd, lambda k: k),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pt_round_trip(tmp_path, model_and_cfg, layout):
    model, cfg = model_and_cfg
    path = tmp_path / "ckpt.pt"
    torch.save(LAYOUTS[layout](model.state_dict()), path)
    loaded = load_generator(cfg, path)
    assert same_weights(model, loaded)


def test_generator_vs_ema_choice(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    other = make_model(cfg, seed=5)
    torch.save({"generator": model.state_dict(), "generator_ema": other.state_dict()}, tmp_path / "c.pt")
    assert same_weights(load_generator(cfg, tmp_path / "c.pt", which="generator"), model)
    assert same_weights(load_generator(cfg, tmp_path / "c.pt", which="generator_ema"), other)
    assert same_weights(load_generator(cfg, tmp_path / "c.pt"), other)  # auto prefers EMA


def test_safetensors_file_and_sharded_dir(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert same_weights(load_generator(cfg, tmp_path / "m.safetensors"), model)
    keys = sorted(sd)
    (tmp_path / "shards").mkdir()
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "shards" / "a.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "shards" / "b.safetensors"))
    assert same_weights(load_generator(cfg, tmp_path / "shards"), model)


def test_bf16_kept_with_dtype_none(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()},
        str(tmp_path / "b.safetensors"),
    )
    m = load_generator(cfg, tmp_path / "b.safetensors", dtype=None)
    assert next(m.parameters()).dtype == torch.bfloat16


def test_missing_unexpected_and_shape_errors_name_keys(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    sd = dict(model.state_dict())
    sd.pop("blocks.1.ffn.2.bias")
    sd["blocks.7.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_generator(cfg, tmp_path / "bad.pt")
    msg = str(e.value)
    assert "blocks.1.ffn.2.bias" in msg and "blocks.7.extra.weight" in msg and "'tiny'" in msg and "dim 64" in msg
    big = make_model(tiny_config(dim=96, num_heads=4), seed=0)
    torch.save(big.state_dict(), tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_generator(cfg, tmp_path / "big.pt")


def test_pickled_or_truncated_files_are_refused(tmp_path, model_and_cfg):
    _, _cfg = model_and_cfg
    torch.save({"generator": {"x": torch.zeros(1)}, "obj": argparse.Namespace(lr=1)}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        read_state_dict(tmp_path / "p.pt")
    (tmp_path / "t.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "none.pt")


def make_lora(model, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.o"):
        lin = dict(model.named_modules())[name]
        out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g)
        out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g)
    return out


def test_longlive_lora_merge_is_exact(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    torch.save({"generator": model.state_dict()}, tmp_path / "base.pt")
    lora = make_lora(model)
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    merged = load_generator(cfg, tmp_path / "base.pt", lora=tmp_path / "lora.pt", lora_alpha=6.0)
    w0 = model.state_dict()["blocks.1.ffn.0.weight"].double()
    a = lora["base_model.model.blocks.1.ffn.0.lora_A.weight"].double()
    b = lora["base_model.model.blocks.1.ffn.0.lora_B.weight"].double()
    expect = (w0 + (6.0 / 3) * b @ a).float()
    assert torch.allclose(merged.state_dict()["blocks.1.ffn.0.weight"], expect, atol=1e-6)
    assert torch.equal(
        merged.state_dict()["blocks.0.self_attn.k.weight"], model.state_dict()["blocks.0.self_attn.k.weight"]
    )


def test_peft_folder_lora_reads_alpha(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    torch.save(model.state_dict(), tmp_path / "base.pt")
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(make_lora(model), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"lora_alpha": 3, "r": 3}))
    m1 = load_generator(cfg, tmp_path / "base.pt", lora=folder)
    m2 = load_generator(cfg, tmp_path / "base.pt")
    merge_lora(m2, make_lora(model), alpha=3.0)
    assert same_weights(m1, m2)


def test_lora_targeting_unknown_layer_is_an_error(model_and_cfg):
    model, _ = model_and_cfg
    with pytest.raises(CheckpointError, match="not a Linear"):
        merge_lora(
            model,
            {
                "blocks.0.norm3.lora_A.weight": torch.zeros(1, 64),
                "blocks.0.norm3.lora_B.weight": torch.zeros(64, 1),
            },
        )


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "streamalign.cli", *args], capture_output=True, text=True)


def test_cli_info_convert_and_clear_errors(tmp_path, model_and_cfg):
    model, _ = model_and_cfg
    torch.save({"generator": {"model." + k: v for k, v in model.state_dict().items()}}, tmp_path / "sf.pt")
    r = run_cli("model", "info", "-c", "tiny", "--checkpoint", str(tmp_path / "sf.pt"))
    assert r.returncode == 0, r.stderr
    assert "loaded strictly" in r.stdout
    r = run_cli("model", "convert", str(tmp_path / "sf.pt"), str(tmp_path / "out.safetensors"), "-c", "tiny")
    assert r.returncode == 0, r.stderr
    assert same_weights(load_generator("tiny", tmp_path / "out.safetensors"), model)
    r = run_cli("model", "info", "-c", "wan-1.3b", "--checkpoint", str(tmp_path / "sf.pt"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "missing" in lines[0]
    r = run_cli("model", "info", "-c", "tiny", "--lora", str(tmp_path / "sf.pt"))
    assert r.returncode == 2 and "--lora needs --checkpoint" in r.stderr
    r = run_cli("model", "convert", str(tmp_path / "nope.pt"), str(tmp_path / "x.safetensors"), "-c", "tiny")
    assert r.returncode == 2 and not (tmp_path / "x.safetensors").exists()


def test_non_floating_tensor_for_a_floating_parameter_is_refused(tmp_path, model_and_cfg):
    model, cfg = model_and_cfg
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 2)
    sd[key] = sd[key].round().to(torch.int32)
    save_file(sd, str(tmp_path / "int.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_generator(cfg, tmp_path / "int.safetensors")
    msg = str(err.value)
    assert f"{key} is int32, the model expects floating float32" in msg and "\n" not in msg


def test_legacy_and_pickled_pt_give_clear_one_line_refusals(tmp_path, model_and_cfg):
    model, _cfg = model_and_cfg
    torch.save(model.state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy \(pre-1\.6, non-zip\) format") as err:
        read_state_dict(tmp_path / "legacy.pt")
    assert "mmap" not in str(err.value).replace("memory-mapped", "")
    torch.save({"generator": {"x": torch.zeros(1)}, "obj": argparse.Namespace(lr=1)}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError) as err:
        read_state_dict(tmp_path / "p.pt")
    msg = str(err.value)
    assert "pickled Python objects (argparse.Namespace)" in msg and "never unpickles" in msg
    assert "\x1b" not in msg and "weights_only=False" not in msg and "\n" not in msg
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a checkpoint")
    with pytest.raises(CheckpointError, match=r"not a torch \(zip\) checkpoint or \.safetensors file"):
        read_state_dict(tmp_path / "junk.pt")
