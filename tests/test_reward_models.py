"""Reward-model adapters (streamalign.rewards.models) on tiny random models saved in each reference's layout.

Nothing is downloaded: tokenizers, Qwen2-VL, CLIP and the open_clip ViT are built here with tiny sizes.
Preprocessing is checked against slow, obvious re-statements of the references' formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from streamalign.rewards import CompositeReward, Reward, RewardError
from streamalign.rewards.models import load_reward_model, preprocess, register_model_reward
from streamalign.rewards.models.qwen2vl import patchify, remap_keys

QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = ["a", "red", "circle", "blue", "square", "moving", "left", "right", "on", "gray", "background"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread than on two contended ones (and leave a core to others)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- builders
def tiny_qwen_tokenizer(folder, extra):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[UNK]", *QWEN_SPECIAL, *extra])}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        additional_special_tokens=[*QWEN_SPECIAL[1:], *extra],
    )
    tok.save_pretrained(folder)
    return tok


def tiny_qwen(folder, tok, seed=0):
    """A random tiny Qwen2VLForConditionalGeneration whose config.json is saved in `folder`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    cfg = Qwen2VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tok),
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    cfg.save_pretrained(folder)
    return model


def old_layout(sd):
    """transformers-5 keys -> the transformers-4.45 names the references saved."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.visual."):
            k = k[len("model.") :]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model.") :]
        out[k] = v.clone()
    return out


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_videoalign(folder, seed=0):
    """KlingTeam/VideoReward's layout: model_config.json, checkpoint-N/model.pth (PEFT-wrapped keys, LoRA r4 on
    every LM linear layer), checkpoint-N/tokenizer; the Qwen2-VL config.json beside it. Returns the merged
    transformers model and head (an independent reference) and the tokenizer."""
    ckpt = folder / "checkpoint-7"
    ckpt.mkdir(parents=True)
    tok = tiny_qwen_tokenizer(ckpt / "tokenizer", ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"])
    model = tiny_qwen(folder, tok, seed)
    g = torch.Generator().manual_seed(seed + 1)
    r, alpha = 4, 8
    sd, merged = {}, model.state_dict()
    for k, v in old_layout(model.state_dict()).items():
        if k.startswith("lm_head"):
            continue
        module, _, leaf = k.rpartition(".")
        if module.startswith("model.layers.") and module.endswith(LORA_TARGETS):
            sd[f"base_model.model.{module}.base_layer.{leaf}"] = v
            if leaf == "weight":
                a = torch.randn(r, v.shape[1], generator=g) * 0.2
                b = torch.randn(v.shape[0], r, generator=g) * 0.2
                sd[f"base_model.model.{module}.lora_A.default.weight"] = a
                sd[f"base_model.model.{module}.lora_B.default.weight"] = b
                new = "model.language_model." + module[len("model.") :] + ".weight"
                merged[new] = merged[new] + alpha / r * b @ a
        else:
            sd[f"base_model.model.{k}"] = v
    head = torch.randn(1, 32, generator=g)
    sd["base_model.model.rm_head.weight"] = head
    torch.save(sd, ckpt / "model.pth")
    config = {
        "data_config": {
            "fps": 2.0,
            "max_frame_pixels": 56 * 84,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {
            "model_name_or_path": "Qwen/Qwen2-VL-2B-Instruct",
            "output_dim": 1,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": r, "lora_alpha": alpha, "use_rslora": False},
        "inference_config": {
            "VQ_mean": 3.6757,
            "VQ_std": 2.2476,
            "MQ_mean": 1.1646,
            "MQ_std": 1.3811,
            "TA_mean": 2.8105,
            "TA_std": 2.5121,
        },
    }
    (folder / "model_config.json").write_text(json.dumps(config))
    model.load_state_dict(merged)
    return model, head, tok


def videos(b=2, f=8, h=48, w=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, f, 3, h, w, generator=g)


# ---------------------------------------------------------------------------------------------- preprocessing
def slow_nframes(total, video_fps, sample_fps=2.0):
    lo = math.ceil(4 / 2) * 2
    hi = math.floor(min(768, total) / 2) * 2
    n = total / video_fps * sample_fps
    n = min(max(n, lo), hi)
    n = round(n / 2) * 2
    return min(n, total)


@pytest.mark.parametrize("total,fps", [(81, 16), (12, 16), (33, 8), (5, 24), (200, 30), (3, 16), (2000, 1), (97, 16)])
def test_frame_sampling_matches_vision_process(total, fps):
    n = slow_nframes(total, fps)
    assert preprocess.smart_nframes(total, fps) == n
    idx = preprocess.sample_indices(total, fps)
    slow = [int(torch.tensor(i * (total - 1) / (n - 1)).round()) for i in range(n)]
    assert idx == slow and len(idx) == n


def test_81_frames_at_16_fps_give_10_frames_and_480x832_gives_336x588():
    assert preprocess.smart_nframes(81, 16) == 10
    assert preprocess.sample_indices(81, 16) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert preprocess.smart_resize(480, 832, 28, 128 * 28 * 28, 200704) == (336, 588)
    assert preprocess.smart_resize(480, 832, 28, 200704, 200704) == (336, 588)  # HPSv3's min = max
    with pytest.raises(ValueError, match="at least 2"):
        preprocess.smart_nframes(1, 16)


@pytest.mark.parametrize("h,w", [(480, 832), (20, 30), (1000, 1000), (64, 7000), (29, 41)])
def test_smart_resize_branches(h, w):
    def slow(h, w, lo, hi):
        hb, wb = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
        if hb * wb > hi:
            beta = math.sqrt(h * w / hi)
            return math.floor(h / beta / 28) * 28, math.floor(w / beta / 28) * 28
        if hb * wb < lo:
            beta = math.sqrt(lo / (h * w))
            return math.ceil(h * beta / 28) * 28, math.ceil(w * beta / 28) * 28
        return hb, wb

    for lo, hi in [(128 * 28 * 28, 200704), (3136, 12845056), (200704, 200704)]:
        got = preprocess.smart_resize(h, w, 28, lo, hi)
        assert got == slow(h, w, lo, hi) and got[0] % 28 == 0 and got[1] % 28 == 0


def test_resize_modes_and_constants():
    x = videos(1, 2, 30, 50)[0]
    f = preprocess.resize(x, (20, 28), "float")
    ref = torch.nn.functional.interpolate(x, size=(20, 28), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(f, ref)
    u = preprocess.resize(x, (20, 28), "uint8")  # torchvision on uint8: float math, clamp, round
    levels = torch.nn.functional.interpolate((x * 255).round(), size=(20, 28), mode="bicubic", antialias=True)
    assert torch.equal(u * 255, levels.clamp(0, 255).round()) and (u * 255 - (u * 255).round()).abs().max() < 1e-4
    p = preprocess.resize(x, (20, 28), "pil")
    assert p.shape == (2, 3, 20, 28) and (p - u).abs().max() < 0.05  # PIL and torch differ, by a little
    assert preprocess.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert preprocess.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    n = preprocess.normalize(torch.ones(3, 2, 2) * 0.5)
    assert torch.allclose(n[1], torch.full((2, 2), (0.5 - 0.4578275) / 0.26130258))


def slow_astrolabe_gray(x):
    """Astrolabe's VideoAlignScorer gray, written out with numpy: floats -> uint8 by (v * 255).round().clamp(0,
    255); then torchvision's _functional_tensor.rgb_to_grayscale on the uint8 tensor, ``(0.2989 * r + 0.587 * g +
    0.114 * b).to(img.dtype)``: uint8 times a Python float is float32 in torch, summed left to right, and the
    cast back to uint8 truncates; repeated on 3 channels. Returns uint8 [..., 3, H, W]."""
    import numpy as np

    a = x.numpy()
    levels = a if a.dtype == np.uint8 else np.clip(np.round(a.astype(np.float32) * np.float32(255)), 0, 255)
    r, g, b = (levels[..., c, :, :].astype(np.float32) for c in range(3))
    gray = (np.float32(0.2989) * r + np.float32(0.587) * g) + np.float32(0.114) * b
    gray = np.trunc(gray).astype(np.uint8)
    return torch.from_numpy(np.repeat(gray[..., None, :, :], 3, axis=-3))


def test_grayscale_is_astrolabes_torchvision_gray_on_uint8_frames():
    x = videos(1, 3, 16, 24, seed=11)[0]
    u = (x * 255).round().clamp(0, 255).to(torch.uint8)
    # pixel by pixel in plain Python floats rounded to float32 steps (struct), truncated with int()
    import struct

    def f32(v):
        return struct.unpack("f", struct.pack("f", v))[0]

    frame = u[1]
    for i in range(16):
        for j in range(24):
            r, g, b = (float(frame[c, i, j]) for c in range(3))
            want = int(f32(f32(f32(f32(0.2989) * r) + f32(f32(0.587) * g)) + f32(f32(0.114) * b)))
            assert int(preprocess.grayscale3(u)[1, 0, i, j]) == want
    ref = slow_astrolabe_gray(u)
    assert torch.equal(preprocess.grayscale3(u), ref) and preprocess.grayscale3(u).dtype == torch.uint8
    assert torch.equal(preprocess.grayscale3(x) * 255, ref.float()) and preprocess.grayscale3(x).dtype == torch.float32
    assert torch.equal(slow_astrolabe_gray(x), ref)
    # the float-then-round order of before gives about half the pixels one level brighter: the test can see it
    old = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mul(255).round()
    brighter = (old - ref[:, 0].float()).eq(1).float().mean().item()
    assert 0.3 < brighter < 0.7


def test_longest_side_pad_and_topk():
    x = torch.ones(1, 3, 120, 200)
    y = preprocess.resize_longest_pad(x, 224)
    assert y.shape == (1, 3, 224, 224)
    nh = round(120 * 224 / 200)  # 134 -> 90 rows of padding, 45 above and 45 below
    assert nh == 134 and y[0, :, :45].abs().max() == 0 and y[0, :, 45 + 134 :].abs().max() == 0
    assert torch.allclose(y[0, :, 45 : 45 + 134], torch.ones(3, 134, 224), atol=1e-5)
    s = torch.tensor([[1.0, 5, 3, 2, 4, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 9]])
    assert torch.equal(preprocess.topk_mean(s, 0.3), torch.tensor([4.0, (9 + 1 + 1) / 3]))  # k = ceil(3.0) = 3
    assert preprocess.topk_mean(s[:, :7], 0.3).tolist() == [4.0, 1.0]  # ceil(2.1) = 3
    assert preprocess.topk_mean(s[:, :1], 0.3).tolist() == [1.0, 1.0]  # at least one frame


def test_patchify_matches_the_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = torch.rand(1, 3, 56, 84)
    ours, grid = patchify(img)
    ref, gh, gw = Qwen2VLImageProcessorPil.patchify(None, img[0].numpy(), 14, 2, 2)
    assert grid == (1, gh, gw) and torch.equal(ours, torch.from_numpy(ref))
    video = torch.rand(4, 3, 28, 56)  # 4.45's video formula, written out
    ours, grid = patchify(video)
    gt, gh, gw = 2, 2, 4
    slow = video.reshape(gt, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(16, -1)
    assert grid == (gt, gh, gw) and torch.equal(ours, slow)


def test_old_transformers_keys_are_remapped():
    sd = {
        "base_model.model.visual.blocks.0.w": 1,
        "base_model.model.model.layers.0.q.base_layer.weight": 2,
        "model.embed_tokens.weight": 3,
        "lm_head.weight": 4,
        "rm_head.0.weight": 5,
        "model.language_model.norm.weight": 6,
    }
    assert remap_keys(sd) == {
        "model.visual.blocks.0.w": 1,
        "model.language_model.layers.0.q.base_layer.weight": 2,
        "model.language_model.embed_tokens.weight": 3,
        "rm_head.0.weight": 5,
        "model.language_model.norm.weight": 6,
    }


# ---------------------------------------------------------------------------------------------- VideoAlign
@pytest.fixture(scope="module")
def videoalign(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoreward")
    ref, head, tok = save_videoalign(folder)
    return folder, ref, head, tok, load_reward_model("videoalign", folder, device="cpu")


def test_videoalign_matches_an_independent_forward(videoalign):
    _, ref, head, tok, model = videoalign
    v, prompts = videos(), ["a red circle moving left", "a blue square"]
    out = model(v, prompts, fps=16)
    assert set(out) == set(model.outputs) and all(t.shape == (2,) for t in out.values())
    # the reference forward by hand on transformers' own Qwen2VLModel with the LoRA merged into the weights
    for i in range(2):
        frames = v[i][preprocess.sample_indices(8, 16)]
        size = preprocess.smart_resize(48, 80, 28, 128 * 28 * 28, 56 * 84)
        pix, grid = patchify(preprocess.normalize(preprocess.resize(frames, size, "uint8")))
        text = model.prompt(prompts[i]).replace("<|video_pad|>", "<|video_pad|>" * (math.prod(grid) // 4))
        ids = tok(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        with torch.no_grad():
            hid = ref.model(
                input_ids=ids,
                pixel_values_videos=pix,
                video_grid_thw=torch.tensor([grid]),
                position_ids=torch.arange(n).view(1, 1, n).expand(3, 1, n),
            ).last_hidden_state
        special = [tok.convert_tokens_to_ids(t) for t in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")]
        raw = [(hid[0, (ids[0] == s).nonzero()[0, 0]] @ head[0]).item() for s in special]
        assert torch.allclose(
            torch.tensor([out["VQ_raw"][i], out["MQ_raw"][i], out["TA_raw"][i]]), torch.tensor(raw), atol=1e-4
        )
    assert torch.allclose(out["VQ"], (out["VQ_raw"] - 3.6757) / 2.2476)
    assert torch.allclose(out["Overall"], out["VQ"] + out["MQ"] + out["TA"])
    assert torch.allclose(out["Overall_raw"], out["VQ_raw"] + out["MQ_raw"] + out["TA_raw"])


def test_videoalign_prompt_is_the_detailed_special_chat(videoalign):
    text = videoalign[-1].prompt("a red circle")
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>\nYou are tasked with evaluating"
    )
    assert "Textual prompt - a red circle\nPlease provide the ratings of Text Alignment: <|TA_reward|>\nEND\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert [text.index(t) for t in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")] == sorted(
        text.index(t) for t in ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
    )


def test_videoalign_batch_invariance_grayscale_and_registry(videoalign):
    folder, *_, model = videoalign
    v, prompts = videos(3, 8, 48, 80, seed=3), ["a red circle", "a blue square moving right", "gray"]
    batched = model(v, prompts, fps=16)
    for i in range(3):
        one = model(v[i : i + 1], prompts[i : i + 1], fps=16)
        assert all(torch.allclose(batched[k][i], one[k][0], atol=1e-5) for k in batched)
    gray = load_reward_model("videoalign", folder, device="cpu", grayscale=True)
    g = gray(v, prompts, fps=16)
    assert not torch.allclose(g["MQ_raw"], batched["MQ_raw"])
    # Astrolabe's gray MQ: the model fed the reference's uint8 gray frames (computed in the test)
    assert torch.allclose(g["MQ_raw"], model(slow_astrolabe_gray(v), prompts, fps=16)["MQ_raw"], atol=1e-5)
    names = register_model_reward("videoalign", folder, model=model, fps=16)
    assert "videoalign_mq" in names and "videoalign_overall_raw" in names
    reward = CompositeReward.parse("videoalign_vq=1,videoalign_mq=0.5,videoalign_ta_raw=1")
    got = reward(v, prompts)
    assert torch.allclose(got["videoalign_mq"], batched["MQ"], atol=1e-5)
    assert torch.allclose(got["composite"], batched["VQ"] + 0.5 * batched["MQ"] + batched["TA_raw"], atol=1e-4)


def test_videoalign_missing_files_are_one_clear_line(tmp_path):
    with pytest.raises(RewardError, match=r"model_config.json not found at .*KlingTeam/VideoReward") as e:
        load_reward_model("videoalign", tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "model_config.json").write_text("{}")
    with pytest.raises(RewardError, match=r"no checkpoint-<N>/model.pth under"):
        load_reward_model("videoalign", tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(RewardError, match="pass base="):
        load_reward_model("videoalign", tmp_path)
    with pytest.raises(RewardError, match="unknown reward model 'nope'"):
        load_reward_model("nope", tmp_path)


# ---------------------------------------------------------------------------------------------- HPSv3
@pytest.fixture(scope="module")
def hpsv3(tmp_path_factory):
    """MizzenAI/HPSv3's layout: HPSv3.safetensors (4.45 key names, embeddings resized for <|Reward|>, lm_head
    kept) beside the base Qwen2-VL folder's config.json and tokenizer (without <|Reward|>)."""
    from safetensors.torch import save_file

    from streamalign.rewards.models.hpsv3 import ranknet_head

    folder = tmp_path_factory.mktemp("hpsv3")
    tok = tiny_qwen_tokenizer(folder, [])
    ref = tiny_qwen(folder, tok, seed=4)
    ref.resize_token_embeddings(len(tok) + 1)
    torch.manual_seed(5)
    head = ranknet_head(32).eval()
    sd = old_layout(ref.state_dict())
    sd.update({f"rm_head.{k}": v.clone() for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "HPSv3.safetensors"))
    return folder, ref, head, load_reward_model("hpsv3", folder, device="cpu", batch_size=3)


def test_hpsv3_frames_match_an_independent_forward_and_top30(hpsv3):
    _, ref, head, model = hpsv3
    v, prompts = videos(2, 4, 40, 60, seed=6), ["a red circle", "a blue square moving left"]
    both = model.frame_scores(v, prompts)
    frames, sigmas = both["score"], both["sigma"]
    assert frames.shape == sigmas.shape == (2, 4)
    tok = model.tokenizer
    reward_id = tok.convert_tokens_to_ids("<|Reward|>")
    assert reward_id == len(tok) - 1  # added at load, as the reference does
    for b, f in [(0, 0), (1, 3)]:
        size = preprocess.smart_resize(40, 60, 28, 200704, 200704)
        assert size == (392, 560)  # the ceil branch (upscaling) may exceed max_pixels, as in the reference
        pix, grid = patchify(preprocess.normalize(preprocess.resize(v[b, f][None], size, "pil")))
        text = model.prompt(prompts[b]).replace("<|image_pad|>", "<|image_pad|>" * (math.prod(grid) // 4))
        ids = tok(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        with torch.no_grad():
            hid = ref.model(
                input_ids=ids,
                pixel_values=pix,
                image_grid_thw=torch.tensor([grid]),
                position_ids=torch.arange(n).view(1, 1, n).expand(3, 1, n),
            ).last_hidden_state
            mu, sigma = head(hid[0, (ids[0] == reward_id).nonzero()[0, 0]].float())
        assert torch.allclose(frames[b, f], mu, atol=1e-4) and torch.allclose(sigmas[b, f], sigma, atol=1e-4)
    assert model.prompt("x").split("<|vision_end|>")[1].startswith("\nYou are tasked with evaluating a generated image")
    assert (
        "Textual prompt - x\n\n\n\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
        in model.prompt("x")
    )
    video = model(v, prompts)
    assert torch.allclose(video["score"], preprocess.topk_mean(frames, 0.3))
    best = [sorted(range(4), key=lambda j: -frames[b, j])[:2] for b in range(2)]  # ceil(0.3 * 4) = 2 frames
    assert torch.allclose(video["sigma"], torch.stack([sigmas[b, best[b]].mean() for b in range(2)]))  # their sigma
    assert register_model_reward("hpsv3", model=model) == ["hpsv3", "hpsv3_sigma"]
    assert torch.allclose(Reward("hpsv3", aggregate="top", topk=0.3)(v, prompts), preprocess.topk_mean(frames, 0.3))
    assert torch.allclose(CompositeReward.parse("hpsv3.sigma=1")(v, prompts)["hpsv3_sigma"], sigmas.mean(1))
    one = model.frame_scores(v[1:], prompts[1:])["score"]
    assert torch.allclose(one, frames[1:], atol=1e-5)  # batch invariance (frames of 2 videos in batches of 3)


def test_hpsv3_missing_weights_and_offload(hpsv3, tmp_path):
    folder, *_, model = hpsv3
    with pytest.raises(RewardError, match=r"hpsv3: weights file not found at .*HPSv3.safetensors.*MizzenAI/HPSv3"):
        load_reward_model("hpsv3", tmp_path, base=folder)
    v = videos(1, 2, 40, 60)
    before = model(v, ["a red circle"])["score"]
    model.offload()
    assert torch.equal(model(v, ["a red circle"])["score"], before)


# ---------------------------------------------------------------------------------------------- HPSv2, CLIP
OPEN_CLIP_KEYS = [
    "visual.class_embedding",
    "visual.positional_embedding",
    "visual.proj",
    "visual.conv1.weight",
    "visual.ln_pre.weight",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "visual.transformer.resblocks.0.attn.out_proj.bias",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "visual.ln_post.bias",
    "token_embedding.weight",
    "positional_embedding",
    "transformer.resblocks.0.ln_1.weight",
    "transformer.resblocks.0.mlp.c_proj.bias",
    "ln_final.weight",
    "text_projection",
    "logit_scale",
]


def save_hpsv2(folder, vocab_size):
    from streamalign.rewards.models.hpsv2 import OpenCLIP

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(7)
    net = OpenCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
    sd = {k: torch.randn_like(v) * 0.2 for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, folder / "HPS_v2.1_compressed.pt")
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return sd


def test_hpsv2_open_clip_layout_scores_frames(tmp_path):
    from tests.test_rewards import _tiny_clip

    (tmp_path / "tokenizer").mkdir()
    _tiny_clip(tmp_path / "tokenizer")  # its CLIP BPE files serve as the tokenizer folder
    tok_size = len(json.loads((tmp_path / "tokenizer" / "vocab.json").read_text()))
    sd = save_hpsv2(tmp_path, tok_size)
    assert all(k in sd for k in OPEN_CLIP_KEYS)
    model = load_reward_model("hpsv2", tmp_path, device="cpu", batch_size=5)
    ids = model.tokenize(["a red circle"])
    assert ids.shape == (1, 77) and ids[0, 0] == tok_size - 2 and ids.argmax() > 0 and ids[0, -1] == 0
    v, prompts = videos(2, 4, 24, 40, seed=8), ["a red circle", "a blue square"]
    frames = model.frame_scores(v, prompts)["score"]
    assert frames.shape == (2, 4) and frames.abs().max() <= 1 + 1e-5
    assert torch.allclose(model(v, prompts)["score"], frames.mean(1))
    assert torch.allclose(model.frame_scores(v[1:], prompts[1:])["score"], frames[1:], atol=1e-5)
    assert not torch.allclose(model.frame_scores(v, prompts[::-1])["score"], frames)
    (tmp_path / "HPS_v2.1_compressed.pt").unlink()
    with pytest.raises(RewardError, match=r"hpsv2: weights file not found at .*HPS_v2.1_compressed.pt"):
        load_reward_model("hpsv2", tmp_path)


def test_clip_scores_frames_and_registers(tmp_path):
    from tests.test_rewards import _tiny_clip

    _tiny_clip(tmp_path)
    model = load_reward_model("clip", tmp_path, device="cpu", batch_size=3)
    v, prompts = videos(2, 3, 30, 50, seed=9), ["a red circle", "a blue square"]
    frames = model.frame_scores(v, prompts)["score"]
    assert frames.shape == (2, 3) and frames.abs().max() <= 1 + 1e-5
    assert torch.allclose(model.frame_scores(v[:1], prompts[:1])["score"], frames[:1], atol=1e-5)
    scaled = load_reward_model("clip", tmp_path, device="cpu", logit_scale=True).frame_scores(v, prompts)["score"]
    assert torch.allclose(scaled, frames * model.net.logit_scale.exp(), atol=1e-4)
    assert register_model_reward("clip", tmp_path, prefix="clip_model", device="cpu") == ["clip_model"]
    got = CompositeReward.parse("clip_model:top50=1")(v, prompts)
    assert torch.allclose(got["clip_model:top50"], preprocess.topk_mean(frames, 0.5), atol=1e-6)
    with pytest.raises(RewardError, match=r"clip: CLIP config.json not found at"):
        load_reward_model("clip", tmp_path / "missing")


def test_readme_reward_models_snippet_runs():
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "reward-models.md").read_text()
    m = re.search(r"<!-- reward-models-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "docs/reward-models.md lost its reward-models snippet"
    r = subprocess.run([sys.executable, "-c", m.group(1)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([2]) torch.Size([2, 6])" in r.stdout
