"""Rewards: each defect lowers exactly the reward that should drop; hacks are caught by OOD metrics;
aggregation, composite and unmixing against slow references; external plug-ins; clear errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from streamalign.rewards import (
    CompositeReward,
    Reward,
    RewardError,
    composite,
    parse_term,
    register_external,
)
from streamalign.worlds.shapes import COLOURS, held_in_prompts, render, sample_videos
from streamalign.worlds.shapes import rewards as R
from streamalign.worlds.shapes.rewards import SHAPES_METRICS, SHAPES_REWARDS
from streamalign.worlds.shapes.world import BACKGROUNDS, Motion

IN_DOMAIN = ["colour_match", "direction_match", "sharpness", "smoothness"]
OOD = ["background_cleanliness", "shape_fidelity"]


@pytest.fixture(scope="module")
def world():
    prompts = held_in_prompts()[::6]  # 42 prompts covering every colour, shape, direction, background
    videos, motion = sample_videos(prompts, 32, 12, torch.Generator().manual_seed(0))
    return prompts, videos, motion


def scores(videos, prompts):
    texts = [p.text for p in prompts]
    return {n: Reward(n)(videos, texts).mean().item() for n in IN_DOMAIN + OOD}


def blur(videos, sigma=1.0):
    k = torch.exp(-(torch.arange(-3, 4.0) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, 7)
    x = videos.flatten(0, 2).unsqueeze(1)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k)
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3))
    return x.view_as(videos)


def test_ground_truth_scores_high_on_every_reward(world):
    prompts, videos, _ = world
    s = scores(videos, prompts)
    floor = {"colour_match": 0.9, "direction_match": 0.95, "sharpness": 0.7, "smoothness": 0.85}
    floor.update({"background_cleanliness": 0.99, "shape_fidelity": 0.95})
    assert all(s[k] >= v for k, v in floor.items()), s


def _only_drops(base, bad, reward, drop, tol=0.1):
    assert base[reward] - bad[reward] >= drop, (reward, base, bad)
    for k in IN_DOMAIN:
        if k != reward:
            assert bad[k] >= base[k] - tol, (k, base, bad)


def test_each_defect_lowers_exactly_its_reward(world):
    prompts, videos, motion = world
    base = scores(videos, prompts)
    names = list(COLOURS)
    wrong_colour = [dataclasses.replace(p, colour=names[(names.index(p.colour) + 3) % 8]) for p in prompts]
    _only_drops(base, scores(render(wrong_colour, motion, 32, 12), prompts), "colour_match", 0.8, tol=0.02)
    backwards = Motion(motion.x0 + 11 * motion.vx, motion.y0 + 11 * motion.vy, -motion.vx, -motion.vy, motion.radius)
    _only_drops(base, scores(render(prompts, backwards, 32, 12), prompts), "direction_match", 0.9, tol=0.02)
    _only_drops(base, scores(blur(videos), prompts), "sharpness", 0.3)
    flicker = videos * torch.tensor([1.0, 0.8] * 6).view(1, 12, 1, 1, 1)
    _only_drops(base, scores(flicker, prompts), "smoothness", 0.15, tol=0.03)


def test_exposure_flicker_lowers_the_rewards_and_the_ood_metric(world):
    """The shapes generator's defect (world.apply_haze on one chunk): colour purity, smoothness and the
    background metric all drop, so every branch of a fork group that flickers less scores higher."""
    from streamalign.worlds.shapes.world import apply_haze

    prompts, videos, _ = world
    base = scores(videos, prompts)
    hazy = scores(apply_haze(videos, torch.tensor([0.0, 0.0, 0.3, 0.0]).expand(len(prompts), 4)), prompts)
    for k, drop in {"colour_match": 0.1, "smoothness": 0.1, "background_cleanliness": 0.1}.items():
        assert base[k] - hazy[k] >= drop, (k, base, hazy)


def test_colour_fill_hack_is_caught_by_background_cleanliness(world):
    prompts, videos, _ = world
    model_like = blur(videos, 1.5)  # a soft, imperfect sample
    fill = torch.tensor([COLOURS[p.colour] for p in prompts]).view(-1, 1, 3, 1, 1).expand_as(videos).clone()
    before, after = scores(model_like, prompts), scores(fill, prompts)
    assert after["colour_match"] > before["colour_match"]
    assert after["background_cleanliness"] < 0.05 < 0.9 < before["background_cleanliness"]
    noise = (videos + 0.3 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert scores(noise, prompts)["background_cleanliness"] < 0.5  # noise "sharpens" but dirties the background


def test_unmix_matches_per_pixel_reference():
    p = held_in_prompts()[40]
    video = torch.rand(1, 1, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    probs, cov = R.unmix(video, [p])
    bg = torch.tensor(BACKGROUNDS[p.background])
    for y in range(3):
        for x in range(3):
            px = video[0, 0, :, y, x]
            alphas, resid = [], []
            for c in COLOURS.values():
                d = torch.tensor(c) - bg
                a = float(torch.clamp(torch.dot(px - bg, d) / torch.dot(d, d), 0, 1))
                alphas.append(a)
                resid.append(float(((px - bg - a * d) ** 2).sum()))
            w = torch.softmax(-torch.tensor(resid) / (2 * R.PALETTE_TEMPERATURE**2), 0)
            assert torch.allclose(probs[0, 0, :, y, x], w, atol=1e-5)
            assert abs(cov[0, 0, y, x].item() - float((w * torch.tensor(alphas)).sum())) < 1e-5


def test_aggregation_composite_and_reweighting(world):
    prompts, videos, _ = world
    texts = [p.text for p in prompts[:5]]
    v = videos[:5]
    frames = Reward("direction_match").frame_scores(v, texts)  # [5, 11] frame pairs
    top = Reward("direction_match", aggregate="top", topk=0.3)(v, texts)
    k = 4  # ceil(0.3 * 11)
    ref = torch.stack([torch.tensor(sorted(row.tolist(), reverse=True)[:k]).mean() for row in frames])
    assert torch.allclose(top, ref) and top.dtype == torch.float32
    comp = CompositeReward.parse(SHAPES_REWARDS, SHAPES_METRICS)
    out = comp(v, texts)
    assert set(out) == {*IN_DOMAIN, *OOD, "composite"}
    want = out["colour_match"] + out["direction_match"] + 0.5 * out["sharpness"] + 0.5 * out["smoothness"]
    assert torch.allclose(out["composite"], want)
    assert torch.allclose(composite(out, {"shape_fidelity": 2.0}), 2 * out["shape_fidelity"])  # offline re-weighting
    assert torch.equal(comp(v, texts)["composite"], out["composite"])  # deterministic
    one = torch.cat([comp(v[i : i + 1], texts[i : i + 1])["composite"] for i in range(5)])
    assert torch.allclose(one, out["composite"], atol=1e-6)  # vectorised == per video
    r, w = parse_term("direction_match:top30:rgb=0.25")
    assert (r.aggregate, r.topk, r.grayscale, w, r.label) == ("top", 0.3, False, 0.25, "direction_match:top30")


def test_clear_errors(world):
    prompts, videos, _ = world
    with pytest.raises(RewardError, match="reward 'colour_match' cannot parse prompt 'a cat on a mat'"):
        Reward("colour_match")(videos[:1], ["a cat on a mat"])
    with pytest.raises(RewardError, match=r"values must lie in \[0, 1\]"):
        Reward("sharpness")(videos[:1] * 2, [prompts[0].text])
    with pytest.raises(RewardError, match="needs colour"):
        Reward("colour_match", grayscale=True)
    with pytest.raises(RewardError, match="unknown reward 'hps'"):
        Reward("hps")
    with pytest.raises(RewardError, match="unknown option"):
        parse_term("sharpness:max=1")
    # paraphrases are fine for rewards that do not parse the grammar
    assert Reward("smoothness")(videos[:1], ["a small red ball drifting leftwards"]).shape == (1,)


def test_external_reward_plugin_from_local_path(tmp_path, world):
    prompts, videos, _ = world
    weights = tmp_path / "brightness_model"
    weights.mkdir()
    (weights / "scale.txt").write_text("2.0")
    plugin = tmp_path / "my_reward.py"
    plugin.write_text(
        "from pathlib import Path\n"
        "def make(path, offset=0.0):\n"
        "    scale = float((Path(path) / 'scale.txt').read_text())\n"
        "    return lambda videos, prompts: scale * videos.mean((1, 2, 3, 4)) + offset\n"
    )
    register_external("brightness", f"{plugin}:make", weights, offset=0.5)
    texts = [p.text for p in prompts[:3]]
    got = CompositeReward.parse("brightness=1,colour_match=0")(videos[:3], texts)
    assert torch.allclose(got["brightness"], 2 * videos[:3].mean((1, 2, 3, 4)) + 0.5)
    with pytest.raises(RewardError, match="does not exist"):
        register_external("x", f"{plugin}:make", tmp_path / "missing")
    with pytest.raises(RewardError, match="no callable 'nope'"):
        register_external("x", f"{plugin}:nope", weights)


def _tiny_clip(folder):
    """A random-weight CLIP (byte-level vocabulary, no merges) saved like a real local checkpoint."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ids = {"bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1, "pad_token_id": len(vocab) - 1}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(
        text_config={**small, "vocab_size": len(vocab), "max_position_embeddings": 77, **ids},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_clip_example_plugin_loads_from_a_local_folder(tmp_path, world):
    from pathlib import Path

    prompts, videos, _ = world
    _tiny_clip(tmp_path)
    example = Path(__file__).resolve().parent.parent / "examples" / "clip_reward.py"
    register_external("clip", f"{example}:make_clip_reward", tmp_path, frame_level=True)
    texts = [p.text for p in prompts[:2]]
    frames = Reward("clip").frame_scores(videos[:2], texts)
    assert frames.shape == (2, 12) and frames.abs().max() <= 1 + 1e-5
    assert torch.equal(Reward("clip")(videos[:2], texts), frames.mean(1))
    swapped = Reward("clip").frame_scores(videos[:2], texts[::-1])
    assert not torch.allclose(frames, swapped)  # the text matters
