"""The named models' presets (self-forcing, causal-forcing, longlive, krea-realtime-14b): their values against
the reference repositories' configs, and every stage on a stand-in checkpoint in each model's published
layout at reduced width (a tiny UMT5 + Wan VAE folder; LongLive with its LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.models.checkpoint import load_generator
from streamalign.models.sampler import Schedule
from streamalign.schemas.config import ModelConfig

from .conftest import make_model
from .test_text_codec import wan_folder  # noqa: F401  (the tiny Diffusers Wan folder, a module fixture)

NAMED = ("self-forcing", "causal-forcing", "longlive", "krea-realtime-14b")
# reduced width: the preset's schedule, cache policy, entries and key layout on a 2-layer, 64-wide model
# (text_dim 32: the tiny UMT5's), 4x4 latents, enough chunks for each rolling cache to roll
REDUCED = {"arch": {"dim": 64, "ffn_dim": 128, "num_heads": 4, "num_layers": 2, "text_len": 8, "text_dim": 32,
                    "freq_dim": 32},
           "latent": {"height": 4, "width": 4}}  # fmt: skip
FRAMES = {"self-forcing": 6, "causal-forcing": 6, "longlive": 15, "krea-realtime-14b": 9}
REWARDS = ["--rewards", "sharpness=1,smoothness=1", "--metrics", ""]
# the default run rolls out LongLive (base + LoRA, a rolling cache); the other presets' stages run in the slow set
EACH = pytest.mark.parametrize("stand_in", NAMED, indirect=True)
ROLLOUTS = pytest.mark.parametrize("stand_in", [n if n == "longlive" else pytest.param(n, marks=pytest.mark.slow)
                                                for n in NAMED], indirect=True)  # fmt: skip


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args: str) -> str:
    r = run(*args)
    assert r.exit_code == 0, r.output
    return r.output


def refused(*args: str) -> str:
    """The one error line of a refused command (exit 2)."""
    r = run(*args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1, r.output
    return lines[0]


def test_model_configs_lists_the_named_presets():
    out = ok("model", "configs")
    for name in NAMED:
        line = next(x for x in out.splitlines() if x.startswith(name + " "))
        assert ModelConfig.load(name).weights.repo in line


def test_presets_hold_the_reference_values():
    """Facts read from the reference repositories (each preset's comments cite repo@commit:path:line)."""
    sf, cf, ll, kr = (ModelConfig.load(n) for n in NAMED)
    wan13, wan14 = ModelConfig.load("wan-1.3b"), ModelConfig.load("wan-14b")
    assert sf.arch == cf.arch == ll.arch == wan13.arch and kr.arch == wan14.arch
    for c in (sf, cf, ll, kr):  # 3 latent frames per block, 4 steps warped on the shift-5 schedule
        assert c.sampler.chunk_frames == 3 and c.sampler.context_t == 0.0 and c.latent.height * 8 == 480
        assert [round(t, 1) for t in Schedule.from_config(c.sampler).timesteps] == [1000.0, 937.5, 833.3, 625.0]
    assert (sf.weights.entry, cf.weights.entry, ll.weights.entry) == ("generator_ema", "generator", "generator")
    assert (sf.latent.frames, cf.latent.frames, ll.latent.frames, kr.latent.frames) == (21, 21, 120, 27)
    assert sf.cache.window is None and cf.cache.window is None
    assert (ll.cache.sink, ll.cache.window) == (3, 9)  # local_attn_size 12 with sink_size 3 inside it
    assert (kr.cache.sink, kr.cache.window) == (0, 6)  # kv_cache_num_frames 3 + the block's own 3
    # Krea recomputes the context's K/V before each block; the others keep the K/V written at each chunk
    assert kr.cache.recompute_context and not any(c.cache.recompute_context for c in (sf, cf, ll))
    assert (ll.lora.rank, ll.lora.alpha, ll.lora.entry) == (256, 256, "generator_lora")
    assert set(ll.lora.targets) == {f"{m}.{p}" for m in ("self_attn", "cross_attn") for p in "qkvo"} | {
        "ffn.0", "ffn.2"}  # fmt: skip
    assert kr.weights.file.endswith(".safetensors") and all(c.lora is None for c in (sf, cf, kr))


def _lora_weights(model: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A LongLive-style peft state dict (keys as peft's get_peft_model_state_dict writes them) over every
    Linear of every block."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks."):
            out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
            out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def stand_in(request, tmp_path_factory, wan_folder):  # noqa: F811
    """(preset, folder, YAML, model flags, the weights the preset's entry must give): a reduced-width config
    extending the preset and a checkpoint written as the model's authors publish theirs."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    data = {"extends": name, **REDUCED, "latent": {**REDUCED["latent"], "frames": FRAMES[name]}}
    if name == "longlive":
        data["lora"] = {"rank": 4, "alpha": 8}  # the shipped geometry at reduced width (scale 2)
    (root / "model.yaml").write_text(yaml.safe_dump(data))
    cfg = ModelConfig.load(root / "model.yaml")
    ema, plain = make_model(cfg, seed=1).state_dict(), make_model(cfg, seed=2).state_dict()
    prefixed = {"causal-forcing": "model._fsdp_wrapped_module."}.get(name, "model.")  # CF's FSDP-wrapped keys

    def keyed(sd):
        return {prefixed + k: v for k, v in sd.items()}

    flags = ["-c", root / "model.yaml", "--wan-dir", wan_folder]
    if name == "krea-realtime-14b":  # a flat bf16 .safetensors, keys "model.blocks..."
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in keyed(plain).items()}, root / "krea.safetensors")
        flags += ["--checkpoint", root / "krea.safetensors"]
        expect = {k: v.to(torch.bfloat16).float() for k, v in plain.items()}
    else:
        torch.save({"generator": keyed(plain), "generator_ema": keyed(ema)}, root / "model.pt")
        flags += ["--checkpoint", root / "model.pt"]
        expect = ema if cfg.weights.entry == "generator_ema" else plain
    if name == "longlive":
        torch.save({"generator_lora": _lora_weights(make_model(cfg), 4, 3)}, root / "lora.pt")
        flags += ["--base-lora", root / "lora.pt"]
    (root / "prompts.txt").write_text("a red circle moving left\na blue circle\n")
    return name, root, cfg, flags, expect


@EACH
def test_model_info_names_the_entry_and_the_merged_lora(stand_in):
    name, root, cfg, flags, expect = stand_in
    out = ok("model", "info", *[f for i, f in enumerate(flags) if i not in (2, 3)])  # model info has no --wan-dir
    entry = next(x for x in out.splitlines() if x.startswith("entry"))
    want = {"generator_ema": "generator_ema (the EMA weights)", "generator": "generator (not the EMA weights)",
            "auto": "the file's tensors (no entries)"}[cfg.weights.entry]  # fmt: skip
    assert entry.endswith(want), out
    lora = next(x for x in out.splitlines() if x.startswith("lora"))
    if name == "longlive":
        assert "lora.pt merged into 20 layers: rank 4, alpha 8 (scale 2)" in lora, out
        base = load_generator(cfg, flags[5]).state_dict()
        merged = load_generator(cfg, flags[5], base_lora=flags[7]).state_dict()
        a, b = (torch.load(root / "lora.pt")["generator_lora"][f"base_model.model.blocks.1.ffn.2.lora_{x}.weight"]
                for x in "AB")  # fmt: skip
        want_w = (base["blocks.1.ffn.2.weight"].double() + 2.0 * b.double() @ a.double()).float()
        assert torch.equal(merged["blocks.1.ffn.2.weight"], want_w)
        sd = base
    else:
        assert lora.endswith("none merged")
        sd = load_generator(cfg, flags[5]).state_dict()
    assert all(torch.equal(sd[k], expect[k]) for k in expect)  # the entry the authors' inference loads


@ROLLOUTS
def test_collect_and_train_run_on_the_stand_in(stand_in):
    """collect (2 groups of 2 branches) and train --mode semi (1 update) on the stand-in, in its cache policy;
    run.yaml records the policy with absolute paths; the adapter names the policy it adapts."""
    _collect_and_train(stand_in)


def _collect_and_train(stand_in) -> None:
    name, root, cfg, flags, _ = stand_in
    ok("collect", *flags, "--prompts", root / "prompts.txt", "--groups", 2, "-G", 2, "--entries-per-shard", 2,
       *REWARDS, "--out", root / "buffer")  # fmt: skip
    rec = yaml.safe_load((root / "buffer" / "run.yaml").read_text())["config"]
    assert rec["cache"] == {"sink": cfg.cache.sink, "window": cfg.cache.window or 0}
    assert all(Path(rec["model"][k]).is_absolute() for k in ("config", "checkpoint", "wan_dir"))
    ok("train", *flags, "--buffer", root / "buffer", "--steps", 1, "--batch-groups", 2, "--lora-rank", 2,
       "--out", root / "semi")  # fmt: skip
    adapter = json.loads((root / "semi" / "adapter" / "adapter_config.json").read_text())
    lora = f" + LoRA {root / 'lora.pt'} (alpha 8)"
    assert adapter["base_model_name_or_path"] == str(flags[5]) + (lora if name == "longlive" else "")
    train_rec = yaml.safe_load((root / "semi" / "run.yaml").read_text())["config"]
    assert train_rec["cache"] == rec["cache"] and train_rec["model"]["base_lora"] == rec["model"]["base_lora"]


@pytest.mark.slow
@EACH
def test_merge_evaluate_generate_run_on_the_stand_in(stand_in):
    """The stages after train on the stand-in: merge (2 scales), evaluate (base vs the adapter), generate."""
    _, root, _, flags, _ = stand_in
    if not (root / "semi" / "adapter").is_dir():
        _collect_and_train(stand_in)
    eval_flags = ["--prompts", root / "prompts.txt", "--seeds", 1, "--samples", 0, "--n-boot", 10, *REWARDS]
    ok("merge", *flags, "--on", root / "semi" / "adapter", "--scales", "0,1", "--ood-metric", "smoothness",
       *eval_flags, "--out", root / "merge")  # fmt: skip
    sweep = json.loads((root / "merge" / "sweep.json").read_text())
    assert set(sweep["rows"]) == {"0", "1"} and sweep["ood_metric"] == "smoothness"
    ok("evaluate", *flags, "--lora", f"semi={root / 'semi' / 'adapter'}", *eval_flags, "--out", root / "eval")
    report = json.loads((root / "eval" / "report.json").read_text())
    assert set(report["models"]) == {"base", "semi"}
    ok("generate", *flags, "--lora", root / "semi" / "adapter", "a red circle", "--out", root / "gen")
    assert (root / "gen" / "0000.mp4").stat().st_size > 0


@EACH
def test_a_real_model_asks_for_what_only_a_world_provides(stand_in):
    """merge without --ood-metric (and every stage without prompts or rewards) on a model with no built-in
    world: one line naming the flag, before anything loads; LongLive without its LoRA: one line naming it."""
    name, root, _, flags, _ = stand_in
    line = refused("merge", *flags, "--on", root, "--prompts", root / "prompts.txt", *REWARDS, "--out", root / "m")
    assert "--ood-metric" in line and "no built-in world" in line
    assert "--prompts" in refused("collect", *flags, "--rewards", "sharpness=1", "--out", root / "b")
    assert "--rewards" in refused("evaluate", *flags, "--prompts", root / "prompts.txt", "--out", root / "e")
    if name == "longlive":
        no_lora = [f for f in flags if str(f) not in ("--base-lora", str(root / "lora.pt"))]
        line = refused("collect", *no_lora, "--prompts", root / "prompts.txt", *REWARDS, "--out", root / "b")
        assert "--base-lora" in line and "models/lora.pt of the Hugging Face repo Efficient-Large-Model/" in line
    assert not any((root / d).exists() for d in ("m", "b", "e"))


@pytest.mark.parametrize("stand_in", ["longlive"], indirect=True)  # a base and a LoRA: both can differ
def test_train_refuses_a_buffer_of_another_policy(stand_in):
    """A buffer collected by this base + LoRA trained with another base or LoRA: one line naming both."""
    _, root, _, flags, _ = stand_in
    if not (root / "buffer").is_dir():
        _collect_and_train(stand_in)
    other = [("none" if str(f) == str(root / "lora.pt") else f) for f in flags]
    line = refused("train", *other, "--buffer", root / "buffer", "--steps", 1, "--batch-groups", 2, "--out", root / "x")
    assert "was collected by policy" in line and str(root / "lora.pt") in line and "this run trains policy" in line
    assert not (root / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMED)
def test_plan_at_full_width(name):
    """Every named preset at full width on fake tensors (its cache policy and 14B weights): a generated video
    as long as the reduced test's (each rolling cache rolls) is planned and fits an 80 GB GPU (bf16). A
    plan at the presets' own rollout lengths takes minutes each on 2 busy cores (LongLive: 120 frames)."""
    out = json.loads(ok("plan", "-c", name, "--stages", "generate", "--frames", FRAMES[name], "--json"))
    gen = out["stages"]["generate"]
    assert gen["fits"] and gen["peak"] > out["weights"]["generator"]
