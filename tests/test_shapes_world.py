"""The shapes world: grammar, held-out split, renderer (against a slow point-in-shape reference), pre-training."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from streamalign.cli import app
from streamalign.worlds.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELD_OUT_PAIRS,
    Motion,
    ShapePrompt,
    all_prompts,
    apply_haze,
    estimate_haze,
    haze_levels,
    held_in_prompts,
    held_out_prompts,
    noise_score,
    parse_prompt,
    remove_haze,
    render,
    sample_videos,
)


def test_grammar_and_split():
    assert len(all_prompts()) == 288
    assert len(held_out_prompts()) == 36 and len(held_in_prompts()) == 252
    assert not {p.text for p in held_in_prompts()} & {p.text for p in held_out_prompts()}
    assert all((p.colour, p.shape) in HELD_OUT_PAIRS for p in held_out_prompts())
    p = parse_prompt("  A Red Circle moving LEFT on a gray background. ")
    assert p == ShapePrompt("red", "circle", "left", "gray")
    assert parse_prompt(p.text) == p
    for bad in [
        "a red circle",
        "a purple circle moving left on a gray background",
        "a red dog moving up on a black background",
    ]:
        assert parse_prompt(bad) is None


def _inside_reference(shape: str, px: float, py: float, cx: float, cy: float, r: float) -> bool:
    """Point-in-shape by geometry (slow, obvious): circle, axis-aligned square, upward equilateral triangle."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return max(abs(dx), abs(dy)) <= 0.886 * r
    big = 1.25 * r
    verts = [(big * math.cos(a), big * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    sign = []
    for (x1, y1), (x2, y2) in zip(verts, verts[1:] + verts[:1], strict=True):
        sign.append((x2 - x1) * (dy - y1) - (y2 - y1) * (dx - x1) >= 0)
    return all(sign) or not any(sign)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_render_matches_point_in_shape_reference(shape):
    p = ShapePrompt("white", shape, "right", "black")
    motion = Motion(
        torch.tensor([15.3]), torch.tensor([16.7]), torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([6.2])
    )
    video = render([p], motion, size=32, frames=1)[0, 0, 0]  # white on black: coverage = red channel
    checked = 0
    for iy in range(32):
        for ix in range(32):
            v = video[iy, ix].item()
            if v in (0.0, 1.0):  # fully covered or empty pixels must agree with the geometry
                assert (v == 1.0) == _inside_reference(shape, ix + 0.5, iy + 0.5, 15.3, 16.7, 6.2), (ix, iy)
                checked += 1
    assert 0 < ((video > 0) & (video < 1)).sum() < 80  # anti-aliased edge pixels exist
    assert checked > 900


def test_sampled_videos_stay_in_frame_and_move_the_prompted_way():
    g = torch.Generator().manual_seed(3)
    prompts = held_in_prompts()
    videos, motion = sample_videos(prompts, 32, 12, g)
    assert videos.shape == (252, 12, 3, 32, 32) and videos.min() >= 0 and videos.max() <= 1
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts])
    border = torch.cat([videos[..., 0, :], videos[..., -1, :], videos[..., :, 0], videos[..., :, -1]], dim=-1)
    # the geometric shape stays inside the frame: at most the anti-aliased fringe of a triangle's apex
    # (coverage < 0.5) reaches the outermost pixels
    fg = torch.tensor([COLOURS[p.colour] for p in prompts]).view(-1, 1, 3, 1)
    cover = ((border - bg.view(-1, 1, 3, 1)).norm(dim=2) / (fg - bg.view(-1, 1, 3, 1)).norm(dim=2)).amax((1, 2))
    assert cover.max() < 0.5 and (cover == 0).float().mean() > 0.9
    vel = torch.stack([motion.vx, motion.vy], 1)
    want = torch.tensor([DIRECTIONS[p.direction] for p in prompts])
    assert torch.allclose(vel / vel.norm(dim=1, keepdim=True), want)
    speed = vel.norm(dim=1)
    assert (speed >= 0.9 - 1e-6).all() and (speed <= 1.6 + 1e-6).all()
    again, _ = sample_videos(prompts, 32, 12, torch.Generator().manual_seed(3))
    assert torch.equal(videos, again)


@pytest.mark.slow  # two short pretrain runs compared bit for bit: minutes on 2 cores
def test_pretrain_is_deterministic_and_writes_its_recipe(tmp_path):
    from streamalign.worlds.shapes.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=3, batch_size=2, eval_every=3, eval_videos=2, warmup=1)
    a = pretrain(cfg, tmp_path / "a", command="test", progress=False)
    pretrain(cfg, tmp_path / "b", command="test", progress=False)
    assert (tmp_path / "a" / "shapes.safetensors").read_bytes() == (tmp_path / "b" / "shapes.safetensors").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "a" / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "colour_rate" in rows[-1]
    assert (tmp_path / "a" / "curve.png").stat().st_size > 1000
    assert a["pretrain_config"]["steps"] == 3 and "held_out" in a
    # the self-rollout fine-tune from those weights is deterministic too
    ft = PretrainConfig(
        steps=2,
        batch_size=2,
        eval_every=2,
        eval_videos=2,
        warmup=0,
        self_rollout=0.5,
        init=str(tmp_path / "a" / "shapes.safetensors"),
    )
    pretrain(ft, tmp_path / "c", progress=False)
    pretrain(ft, tmp_path / "d", progress=False)
    assert (tmp_path / "c" / "shapes.safetensors").read_bytes() == (tmp_path / "d" / "shapes.safetensors").read_bytes()
    assert (tmp_path / "c" / "shapes.safetensors").read_bytes() != (tmp_path / "a" / "shapes.safetensors").read_bytes()
    # so is the exposure-flicker fine-tune (stage 2 of the shipped recipe), which records its provenance
    hz = ft.model_copy(update={"self_rollout": 0.0, "haze": 0.5})
    e = pretrain(hz, tmp_path / "e", progress=False)
    pretrain(hz, tmp_path / "f", progress=False)
    assert (tmp_path / "e" / "shapes.safetensors").read_bytes() == (tmp_path / "f" / "shapes.safetensors").read_bytes()
    assert e["init_sha256"] == a["weights_sha256"] != e["weights_sha256"]
    with pytest.raises(ValueError, match="cannot be combined"):
        PretrainConfig(haze=0.5, self_rollout=0.5)


def test_cli_pretrain_and_prompts(tmp_path):
    r = CliRunner().invoke(
        app, ["shapes", "pretrain", "--out", str(tmp_path), "--steps", "2", "--batch-size", "2", "--eval-every", "2"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and (tmp_path / "pretrain.yaml").is_file()
    r = CliRunner().invoke(app, ["shapes", "prompts", "--held-out"])
    assert r.exit_code == 0 and len(r.output.splitlines()) == 36


def test_motion_onset_holds_the_shape_still_then_moves_as_prompted():
    prompts = held_in_prompts()[:8]
    onset = torch.tensor([0, 3, 6, 3, 0, 6, 3, 0])
    videos, motion = sample_videos(prompts, 32, 12, torch.Generator().manual_seed(1), onset)
    cx, cy = motion.positions(12)
    for i, p in enumerate(prompts):
        k = int(onset[i])
        assert torch.equal(videos[i, : k + 1], videos[i, :1].expand(k + 1, -1, -1, -1))  # still until onset
        step = torch.stack([cx[i, k + 1] - cx[i, k], cy[i, k + 1] - cy[i, k]])
        assert torch.allclose(step / step.norm(), torch.tensor(DIRECTIONS[p.direction]))


def test_self_rollout_latents_continue_from_the_models_own_first_chunk():
    from streamalign.pipeline import Pipeline
    from streamalign.worlds.shapes import rewards as R
    from streamalign.worlds.shapes.pretrain import self_rollout_latents

    world = Pipeline.from_weights("shapes", None)  # random weights: any first chunk will do
    prompts = held_in_prompts()[:4]
    g = torch.Generator().manual_seed(0)
    text = world.text.encode([p.text for p in prompts])
    z = self_rollout_latents(world.sampler, world.codec, prompts, text, [1, 2, 3, 4], g)
    first = world.sampler.denoise_chunk(world.sampler.new_cache(4, 1), 0, world.sampler.noise_bank([1, 2, 3, 4]), text)
    assert torch.equal(z[:, :3], first.x0)  # chunk 0 is the model's own sample
    rendered = world.codec.decode(z[:, 3:])
    centre, _ = R.centroids(R.foreground(rendered, prompts))
    step = centre[:, 1:] - centre[:, :-1]
    want = torch.tensor([DIRECTIONS[p.direction] for p in prompts])
    assert ((step * want[:, None]).sum(-1) >= -1e-3).all()  # the rendered continuation moves as prompted


def test_haze_is_read_from_the_noise_and_invertible():
    g = torch.Generator().manual_seed(0)
    z = noise_score(torch.randn(4000, 12, 48, 8, 8, generator=g), 3)  # [4000, 4]
    assert z.shape == (4000, 4) and abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05  # N(0, 1)
    lv = haze_levels(z, 0.5)
    ref = torch.tensor([0.5 * max(0.0, 2 * (0.5 * (1 + math.erf(v / math.sqrt(2)))) - 1) for v in z.flatten().tolist()])
    assert torch.allclose(lv.flatten(), ref, atol=1e-6)
    assert abs((lv == 0).float().mean() - 0.5) < 0.02 and lv.max() <= 0.5  # half the chunks clean
    prompts = held_in_prompts()[::40]
    videos, _ = sample_videos(prompts, 32, 12, torch.Generator().manual_seed(1))
    levels = torch.rand(len(prompts), 4, generator=g) * 0.5
    hazy = apply_haze(videos, levels)
    px = hazy[1, 4, :, 0, 0]  # a pixel of chunk 1 of video 1: p + h (1 - p)
    assert torch.allclose(px, videos[1, 4, :, 0, 0] + levels[1, 1] * (1 - videos[1, 4, :, 0, 0]))
    assert torch.allclose(estimate_haze(hazy, prompts), levels.repeat_interleave(3, 1), atol=1e-5)
    assert torch.allclose(remove_haze(hazy, prompts), videos, atol=1e-5)
    assert torch.equal(estimate_haze(videos, prompts), torch.zeros(len(prompts), 12))
