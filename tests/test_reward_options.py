"""The references' reward-model options (issue 28): VideoAlign's ``num_frames`` / ``sample_fps`` per call and as
``--reward-option``, Astrolabe's ``reward_from_frames`` preprocessing, HPSv3's sigma and yaml config, the base
Qwen2-VL folder found from the model folder, the reward device under a launcher, and decoded videos waiting
as uint8 in collect. Tiny Qwen2-VL models built in code (tests/test_reward_models.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from streamalign.rewards import CompositeReward, Reward, RewardError
from streamalign.rewards.models import load_reward_model, preprocess, register_model_reward
from streamalign.rewards.models.base import pick_device
from streamalign.rewards.sources import _LOADED, reward_of
from streamalign.schemas.sections import RewardSection
from tests.test_reward_models import old_layout, one_thread, save_videoalign, tiny_qwen, tiny_qwen_tokenizer, videos

__all__ = ["one_thread"]  # the module's autouse fixture applies here too


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoreward")
    save_videoalign(folder)
    return folder


@pytest.fixture(scope="module")
def model(folder):
    return load_reward_model("videoalign", folder, device="cpu")


# ---------------------------------------------------------------------------------------------- frame counts
def slow_count(total, num_frames):
    """vision_process.smart_nframes with ``nframes``: round_by_factor(nframes, 2), capped at the total."""
    n = round(num_frames / 2) * 2
    if n > total:
        n = total
    if not 2 <= n <= total:
        raise ValueError(n)
    return n


@pytest.mark.parametrize("total,n", [(81, 10), (81, 5), (81, 7), (9, 12), (12, 3), (81, 1), (2, 2), (81, 81)])
def test_num_frames_rule_is_smart_nframes_with_nframes(total, n):
    try:
        want = slow_count(total, n)
    except ValueError:
        with pytest.raises(ValueError, match="at least 2"):
            preprocess.count_nframes(total, n)
        return
    assert preprocess.count_nframes(total, n) == want
    idx = preprocess.sample_indices(total, 16, None, n)
    assert idx == [int(torch.tensor(i * (total - 1) / (want - 1)).round()) for i in range(want)]
    with pytest.raises(ValueError, match="exclusive"):
        preprocess.sample_indices(total, 16, 2.0, n)


def test_videoalign_num_frames_and_sample_fps_per_call_and_at_load(folder, model):
    v, prompts = videos(1, 12, 48, 80, seed=21), ["a red circle"]
    idx = [round(i * 11 / 5) for i in range(6)]  # linspace(0, 11, 6).round(): 0 2 4 7 9 11
    assert idx == [0, 2, 4, 7, 9, 11]
    six = model(v, prompts, fps=16, num_frames=6)
    presampled = model(v[:, idx].contiguous(), prompts, fps=16, num_frames=6)  # 6 of 6 frames: all of them
    assert all(torch.allclose(six[k], presampled[k], atol=1e-6) for k in six)
    assert not torch.allclose(six["VQ_raw"], model(v, prompts, fps=16)["VQ_raw"])  # 4 frames by the rate rule
    # the rate rule per call: 12 frames at 4 fps sampled at 2 fps -> 6, at 4 fps -> 12
    assert torch.allclose(model(v, prompts, fps=4)["VQ_raw"], six["VQ_raw"], atol=1e-6)
    fast = model(v, prompts, fps=4, sample_fps=4.0)
    assert torch.allclose(fast["VQ_raw"], model(v, prompts, fps=16, num_frames=12)["VQ_raw"], atol=1e-6)
    with pytest.raises(RewardError, match="exclusive"):
        model(v, prompts, fps=16, num_frames=6, sample_fps=2.0)
    with pytest.raises(RewardError, match="at least 2"):
        model(v, prompts, fps=16, num_frames=1)
    at_load = load_reward_model("videoalign", folder, device="cpu", num_frames=6)
    assert torch.equal(at_load(v, prompts, fps=16)["MQ_raw"], six["MQ_raw"])
    with pytest.raises(RewardError, match="exclusive"):
        load_reward_model("videoalign", folder, device="cpu", num_frames=6, sample_fps=2.0)
    # as --reward-option, the same numbers
    _LOADED.clear()
    reward = reward_of(RewardSection(rewards="videoalign.MQ=1", reward_paths=f"videoalign={folder}",
                                     reward_options="videoalign.num_frames=6", reward_device="cpu"))  # fmt: skip
    assert torch.allclose(reward(v, prompts)["videoalign_mq"], six["MQ"], atol=1e-6)
    _LOADED.clear()


def test_a_configured_num_frames_wins_over_the_rate_and_refuses_sample_fps(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "model_config.json").read_text())
    cfg["data_config"]["num_frames"] = 6
    (tmp_path / "m" / "model_config.json").write_text(json.dumps(cfg))
    configured = load_reward_model("videoalign", tmp_path / "m", device="cpu")
    v, prompts = videos(1, 12, 48, 80, seed=22), ["a red circle"]
    per_call = load_reward_model("videoalign", folder, device="cpu")(v, prompts, fps=16, num_frames=6)
    assert torch.equal(configured(v, prompts, fps=16)["TA_raw"], per_call["TA_raw"])
    with pytest.raises(RewardError, match="sets num_frames=6"):
        load_reward_model("videoalign", tmp_path / "m", device="cpu", sample_fps=2.0)
    with pytest.raises(RewardError, match="per-call sample_fps would be ignored"):
        configured(v, prompts, fps=16, sample_fps=2.0)
    assert torch.equal(configured(v, prompts, fps=16, num_frames=6)["TA_raw"], per_call["TA_raw"])


# ---------------------------------------------------------------------------------------------- Astrolabe
def test_astrolabe_preprocess_equals_the_files_route_at_81_frames_16_fps_480x832(folder):
    files = load_reward_model("videoalign", folder, device="cpu", max_pixels=200704)  # the released config's
    astro = load_reward_model("videoalign", folder, device="cpu", preprocess="astrolabe")
    g = torch.Generator().manual_seed(23)
    v = torch.randint(0, 256, (1, 81, 3, 480, 832), dtype=torch.uint8, generator=g)  # decoded 8-bit frames
    slow = [round(i * 80 / 9) for i in range(10)]  # process_wanvideo_tensor: linspace(0, 80, 10).round()
    assert astro.frames_of(v[0], 16) == slow == files.frames_of(v[0], 16)
    assert astro.size_of(480, 832) == (336, 588) == files.size_of(480, 832)
    a, f = astro(v, ["a red circle"], fps=16), files(v, ["a red circle"], fps=16)
    assert all(torch.equal(a[k], f[k]) for k in a)
    # elsewhere they part: 10 frames at 336x588 whatever the rate and size
    short = torch.zeros(33, 3, 48, 80)
    assert astro.frames_of(short, 8) == [round(i * 32 / 9) for i in range(10)] and len(files.frames_of(short, 8)) == 8
    assert astro.size_of(48, 80) == (336, 588) != files.size_of(48, 80)
    with pytest.raises(RewardError, match="always samples 10 frames"):
        astro(v, ["a red circle"], fps=16, num_frames=6)
    with pytest.raises(RewardError, match="preprocess=astrolabe fixes"):
        load_reward_model("videoalign", folder, device="cpu", preprocess="astrolabe", sample_fps=2.0)
    with pytest.raises(RewardError, match="preprocess must be one of"):
        load_reward_model("videoalign", folder, device="cpu", preprocess="nope")


def test_model_name_or_path_is_resolved_against_the_model_folder(folder, model, tmp_path, monkeypatch):
    m = tmp_path / "VideoReward"
    shutil.copytree(folder, m)
    base = m / "Qwen" / "Qwen2-VL-2B-Instruct"  # model_config.json names Qwen/Qwen2-VL-2B-Instruct
    base.mkdir(parents=True)
    (m / "config.json").rename(base / "config.json")
    monkeypatch.chdir(tmp_path / "..")  # not the model folder: the working directory plays no part
    v, prompts = videos(1, 8, 48, 80, seed=24), ["a red circle"]
    assert torch.equal(load_reward_model("videoalign", m, device="cpu")(v, prompts)["VQ_raw"],
                       model(v, prompts)["VQ_raw"])  # fmt: skip
    shutil.rmtree(m / "Qwen")
    with pytest.raises(RewardError, match=r"looked in .*VideoReward/Qwen/Qwen2-VL-2B-Instruct.*pass base="):
        load_reward_model("videoalign", m, device="cpu")


# ---------------------------------------------------------------------------------------------- HPSv3 yaml
def save_hpsv3(folder, head, cfg):
    """HPSv3.safetensors with `head` as rm_head, the base Qwen2-VL (config + tokenizer) in folder/base, and the
    training yaml `cfg` (model_name_or_path: base)."""
    from safetensors.torch import save_file

    tok = tiny_qwen_tokenizer(folder / "base", [])
    ref = tiny_qwen(folder / "base", tok, seed=31)
    ref.resize_token_embeddings(len(tok) + 1)
    sd = old_layout(ref.state_dict())
    sd.update({f"rm_head.{k}": v.clone() for k, v in head.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "HPSv3.safetensors"))
    (folder / "HPSv3_7B.yaml").write_text(yaml.safe_dump({"model_name_or_path": "base", **cfg}))
    return folder / "HPSv3_7B.yaml"


def test_hpsv3_reads_its_yaml_head_and_base(tmp_path):
    torch.manual_seed(32)
    # rm_head_kwargs: the reference's module tree written out (0-2, layer_1, output_layer), output_dim 2
    head = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Dropout(0.1))
    head.add_module("layer_1", torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Dropout(0.1)))
    head.add_module("output_layer", torch.nn.Linear(8, 2, bias=False))
    cfg = save_hpsv3(tmp_path, head, {"rm_head_type": "ranknet", "output_dim": 2, "use_special_tokens": True,
                                      "rm_head_kwargs": {"hidden_size": 8, "num_layers": 3}})  # fmt: skip
    with pytest.raises(RewardError, match=r"looked in .*Qwen/Qwen2-VL-7B-Instruct"):
        load_reward_model("hpsv3", tmp_path, device="cpu", pixels=3136)  # no yaml: the released base path
    with pytest.raises(RewardError, match="does not match the Qwen2-VL config"):  # ... and the released head
        load_reward_model("hpsv3", tmp_path, base=tmp_path / "base", device="cpu", pixels=3136)
    m = load_reward_model("hpsv3", tmp_path, device="cpu", pixels=3136, config=cfg)
    v, prompts = videos(1, 3, 40, 60, seed=33), ["a red circle"]
    frames = m.frame_scores(v, prompts)
    assert set(frames) == {"score", "sigma"}
    # the loaded head is the saved one: the same pooled hidden states through the hand-built head
    size = preprocess.smart_resize(40, 60, 28, 3136, 3136)
    patches = [m.inputs.frames(f[None], size, "pil") for f in v[0]]
    ids, mask, pix, grid, token = m.inputs.batch([m.prompt(prompts[0])] * 3, patches, "image", "cpu")
    with torch.no_grad():
        hidden = m.net.hidden_states(ids, mask, pix, grid, token)
        want = head.eval()((hidden[ids == m.special_ids[0]]).float())
    assert torch.allclose(frames["score"][0], want[:, 0], atol=1e-5)
    assert torch.allclose(frames["sigma"][0], want[:, 1], atol=1e-5)


def test_hpsv3_without_sigma_and_unsupported_yaml(tmp_path):
    torch.manual_seed(34)
    cfg = save_hpsv3(tmp_path, torch.nn.Linear(32, 1, bias=False), {"rm_head_type": "default", "output_dim": 1,
                                                                    "use_special_tokens": True})  # fmt: skip
    m = load_reward_model("hpsv3", tmp_path, device="cpu", pixels=3136, config=cfg)
    v = videos(1, 2, 40, 60, seed=35)
    assert set(m.frame_scores(v, ["a red circle"])) == {"score"}
    assert register_model_reward("hpsv3", model=m, prefix="hpsv3_mu") == ["hpsv3_mu", "hpsv3_mu_sigma"]
    assert Reward("hpsv3_mu")(v, ["a red circle"]).shape == (1,)
    with pytest.raises(RewardError, match="gives no 'sigma' output"):
        Reward("hpsv3_mu_sigma")(v, ["a red circle"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"use_special_tokens": False, "reward_token": "last"}))
    with pytest.raises(RewardError, match="only the <\\|Reward\\|> special-token pooling"):
        load_reward_model("hpsv3", tmp_path, device="cpu", config=bad)
    with pytest.raises(RewardError, match="config yaml not found"):
        load_reward_model("hpsv3", tmp_path, device="cpu", config=tmp_path / "none.yaml")


# ---------------------------------------------------------------------------------------------- device
def test_reward_device_under_a_launcher(monkeypatch, folder):
    if not torch.cuda.is_available():
        with pytest.raises(RewardError, match="--reward-device cuda: CUDA is not available"):
            pick_device("cuda")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only device names are made below
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert pick_device("cuda") == torch.device("cuda", 1)  # this rank's GPU, not GPU 0 for every rank
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(RewardError, match=r"--reward-device cuda:0: under a launcher every rank") as e:
        pick_device("cuda:0")
    assert "\n" not in str(e.value)
    with pytest.raises(RewardError, match=r"--reward-device cuda:0: under a launcher"):  # before any model loads
        reward_of(RewardSection(rewards="videoalign.MQ=1", reward_paths=f"videoalign={folder}",
                                reward_device="cuda:0"))  # fmt: skip
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pick_device("cuda:0") == torch.device("cuda", 0)  # one process: an explicit GPU is unambiguous


# ---------------------------------------------------------------------------------------------- uint8 in collect
def test_collect_keeps_videos_uint8_for_8bit_rewards_with_the_same_rewards(folder):
    from streamalign.collect.collector import CollectConfig, collect_group, roll_out_group, score_group
    from streamalign.io.media import to_uint8
    from streamalign.pipeline import Pipeline
    from streamalign.worlds.shapes import held_in_prompts

    policy = Pipeline.load("shapes")
    prompts = tuple(p.text for p in held_in_prompts()[::40])
    _LOADED.clear()
    section = dict(rewards="videoalign.MQ=1,videoalign.VQ:gray=0.5", reward_paths=f"videoalign={folder}",
                   reward_device="cpu", reward_options="videoalign.min_pixels=3136")  # fmt: skip
    cfg = CollectConfig(prompts=prompts, groups=1, group_size=2, **section).resolve(policy.config)
    reward = reward_of(cfg)
    assert reward.reads_levels and not CompositeReward.parse("sharpness=1").reads_levels
    before = roll_out_group(policy, cfg, 0)  # float32, as every collect did before
    rolled = roll_out_group(policy, cfg, 0, uint8=True)
    assert before.videos.dtype == torch.float32 and rolled.videos.dtype == torch.uint8
    assert torch.equal(rolled.videos, to_uint8(before.videos))
    assert rolled.videos.nbytes * 4 == before.videos.nbytes
    pixel = Reward("sharpness")  # a float reward given uint8 converts it whole: the same as its floats
    assert torch.equal(pixel(rolled.videos, ["x"] * 2), pixel(rolled.videos.float() / 255, ["x"] * 2))
    want = score_group(before, reward).rewards
    got = collect_group(policy, cfg, reward, 0).rewards  # the collector's own path: uint8 videos
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    _LOADED.clear()
