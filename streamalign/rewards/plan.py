"""Reward models in ``streamalign plan``: each declared model built from its own config on fake tensors (no
weights read: a folder with its configs is enough), its weights and the peak of one scoring batch measured
by the adapter's own scoring code (docs/planner-rewards.md).

VideoAlign: ``model_config.json`` and the Qwen2-VL ``config.json`` (``base=`` or the folder's own), LoRA
(``peft_lora_config.lora_r``) on every language-model linear layer as KlingTeam/VideoReward trained it,
the 3-token reward head. The scoring batch runs :meth:`VideoAlignReward._score` on ``batch_size`` videos
of the run's frames and resolution, with token ids standing in for the tokenizer's: the video tokens the
frame sampling and ``smart_resize`` give, plus ``text_tokens`` of chat and prompt (the three reward tokens
last).

HPSv3: the Qwen2-VL-7B ``config.json`` (``base=`` or the folder's own), the head of the checkpoint's yaml
(``config=``), ``HPSv3Reward._frame_scores`` on ``batch_size`` frames as images. HPSv2.1: open_clip's
CLIP from ``open_clip_config.json`` (ViT-H-14 without one). CLIP: ``CLIPModel`` from ``config.json``.
The frame-level models score one batch of ``batch_size`` frames, with token ids standing in for the
tokenizer's (:class:`PlanTokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..models.memory import CUDA_RESERVE, HostLogic, fake_module
from .models import hpsv3 as H
from .models import preprocess as P
from .models import qwen2vl as Q
from .models.base import RewardModelError, need_file, read_json
from .models.hpsv3 import HPSv3Reward
from .models.videoalign import HINT, SPECIAL_TOKENS, VideoAlignReward
from .registry import as_float

PLAN_TEXT_TOKENS = 320  # chat template + the detailed_special prompt (~250 Qwen2 tokens) + a long prompt
HPSV3_TEXT_TOKENS = 520  # chat template + HPSv3's instruction and suffix (~1.9k characters, ~440 tokens) + a prompt
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanInputs(Q.QwenInputs):
    """:class:`QwenInputs` without a tokenizer: every chat is `text_tokens` ids (the reward tokens last)
    after its expanded video tokens, right-padded as the tokenizer pads."""

    def __init__(self, config, text_tokens: int, special_ids: list[int], who: str) -> None:
        vc = config.vision_config
        self.patch, self.merge, self.temporal = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        self.factor = self.patch * self.merge
        self.who, self.text_tokens, self.special_ids = who, text_tokens, special_ids
        self.video_id, self.image_id = config.video_token_id, config.image_token_id

    def batch(self, texts, patches, kind, device):
        counts = [g[0] * g[1] * g[2] // self.merge**2 for _, g in patches]
        length = max(counts) + self.text_tokens
        token_id = self.video_id if kind == "video" else self.image_id
        text = [0] * (self.text_tokens - len(self.special_ids)) + self.special_ids  # reward tokens last
        rows = [[token_id] * n + text for n in counts]
        # from Python lists: real values under HostLogic (torch.tensor lifts a real tensor), whatever the length
        ids = torch.tensor([r + [0] * (length - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long)
        pixels = torch.cat([p for p, _ in patches]).to(device)
        grid = torch.tensor([g for _, g in patches], dtype=torch.long, device=device)
        return ids.to(device), mask.to(device), pixels, grid, token_id


@dataclass
class PlannedReward:
    """A reward model on fake tensors: its weights on the device stand-in, ``score(videos)`` (one scoring
    batch of videos [B, F, 3, H, W] on the host stand-in, the meta device) and B, its batch size."""

    name: str
    weights: list[torch.Tensor]
    score: Callable[[torch.Tensor], Any]
    batch: int


def reward_hold(mode: str, peak_kept: int | None = None, memory: int | None = None) -> Literal["keep", "cpu"]:
    """What the reward models do between scoring calls under ``--reward-offload`` `mode`: ``keep`` stays,
    ``cpu`` leaves; ``auto`` is ``cpu`` when the stage's peak with them kept (`peak_kept`, bytes) plus
    ``CUDA_RESERVE`` exceeds the GPU's `memory` (bytes), else ``keep`` (also when either is unknown: no plan,
    as on a CPU, where nothing would be gained). The one rule of ``plan`` and the stages."""
    if mode not in ("auto", "keep", "cpu"):
        raise ValueError(f"--reward-offload must be auto, keep or cpu; got {mode!r}")
    if mode != "auto":
        return mode  # type: ignore[return-value]
    if peak_kept is None or memory is None:
        return "keep"
    return "keep" if peak_kept + CUDA_RESERVE <= memory else "cpu"


def fake_qwen_net(config, dtype: torch.dtype, mode: FakeTensorMode, head: torch.nn.Module, who: str, path: Path,
                  lora_r: int | None = None, lora_alpha=None, use_rslora: bool = False,
                  head_fp32: bool = False):  # fmt: skip
    """The adapters' own :func:`qwen2vl.build` of a Qwen2-VL reward net with fake weights (shapes from
    `config`; `head` a meta-device module whose weights are made in float32 with `head_fp32`, else in
    `dtype`), LoRA of rank `lora_r` on every language-model linear layer (None: none)."""
    from transformers import Qwen2VLModel

    model = fake_module(lambda: Qwen2VLModel(config), dtype, mode)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    with mode:
        if lora_r:
            for name, mod in model.language_model.named_modules():
                if name.startswith("layers.") and name.endswith(LORA_TARGETS):
                    key = f"model.language_model.{name}"
                    for leaf in ("weight", "bias"):
                        if getattr(mod, leaf, None) is not None:
                            sd[f"{key}.base_layer.{leaf}"] = sd.pop(f"{key}.{leaf}")
                    sd[f"{key}.lora_A.default.weight"] = torch.empty(lora_r, mod.in_features, dtype=dtype)
                    sd[f"{key}.lora_B.default.weight"] = torch.empty(mod.out_features, lora_r, dtype=dtype)
        for k, v in head.state_dict().items():
            sd[f"rm_head.{k}"] = torch.empty(v.shape, dtype=torch.float32 if head_fp32 else dtype)
    # the adapter's own build (peft injection on the meta device, then the fake weights assigned), outside the
    # fake mode: peft moves its new layers to the base layer's (meta) device, which a fake mode cannot swap
    net = Q.build(config, sd, head, who, path, head_fp32=head_fp32, lora_alpha=lora_alpha, use_rslora=use_rslora)
    with mode:
        for sub in net.modules():  # the rotary buffers build made real: fake ones, cast as the adapter's .to()
            for name, b in sub._buffers.items():
                if b is not None and not isinstance(b, FakeTensor):
                    b = mode.from_tensor(b)
                    sub._buffers[name] = b.to(dtype) if b.is_floating_point() else b
        net.eval().requires_grad_(False)
    return net


def fake_videoalign(path: str | Path, options: dict, dtype: torch.dtype, mode: FakeTensorMode,
                    text_tokens: int = PLAN_TEXT_TOKENS) -> VideoAlignReward:  # fmt: skip
    """A VideoAlignReward whose network has fake weights (shapes from the configs) under `mode`, scoring as
    the adapter does on the planned device (the fake CPU)."""
    path = Path(path)
    cfg = read_json(path / "model_config.json", "videoalign", HINT)
    data, peft_cfg = cfg.get("data_config", {}), cfg.get("peft_lora_config", {})
    named = (cfg.get("model_config") or {}).get("model_name_or_path")
    base = Q.base_folder(path, options.get("base"), named, "videoalign", "Qwen2-VL-2B-Instruct")
    config = Q.load_config(base, "videoalign", "pass videoalign.base=<Qwen2-VL folder> (its config.json)")
    r = peft_cfg.get("lora_r") if peft_cfg.get("lora_enable", True) else None
    out_dim = int((cfg.get("model_config") or {}).get("output_dim", 1))
    head = torch.nn.Linear(config.text_config.hidden_size, out_dim, bias=False, dtype=dtype, device="meta")
    net = fake_qwen_net(config, dtype, mode, head, "videoalign", path, r, peft_cfg.get("lora_alpha"),
                        bool(peft_cfg.get("use_rslora")))  # fmt: skip
    rm = VideoAlignReward.__new__(VideoAlignReward)
    rm.device, rm.dtype, rm.net, rm._offloaded = torch.device("cpu"), dtype, net, False
    rm.batch_size = int(options.get("batch_size", 2))
    rm.norm = {k: (0.0, 1.0) for k in ("VQ", "MQ", "TA")}
    rm.sample_fps = float(options.get("sample_fps") or data.get("fps") or 2.0)
    rm.max_pixels = int(options.get("max_pixels") or data.get("max_frame_pixels") or 200704)
    rm.min_pixels = int(options.get("min_pixels", P.VIDEO_MIN_PIXELS))
    rm.grayscale, rm.resample = bool(options.get("grayscale", False)), options.get("resample", "uint8")
    rm.preprocess = options.get("preprocess", "files")
    num_frames = options.get("num_frames", data.get("num_frames"))
    rm.num_frames = None if num_frames is None else float(num_frames)
    vocab = config.text_config.vocab_size
    rm.special_ids = list(range(vocab - len(SPECIAL_TOKENS), vocab))  # the added tokens: the vocabulary's last
    rm.inputs = PlanInputs(config, text_tokens, rm.special_ids, "videoalign")
    rm.prompt = lambda text: text  # type: ignore[method-assign]  (PlanInputs needs no chat text)
    return rm


def plan_videoalign(path: str, options: dict, dtype: torch.dtype, mode: FakeTensorMode) -> PlannedReward:
    rm = fake_videoalign(path, options, dtype, mode, int(options.get("plan_text_tokens", PLAN_TEXT_TOKENS)))
    fps = float(options.get("fps", 16.0))

    def score(videos: torch.Tensor) -> object:
        with HostLogic():  # frame indices, token ids and masks are real: the adapter's code reads them
            return rm._score(videos, [""] * videos.shape[0], fps)

    return PlannedReward("videoalign", [*rm.net.parameters(), *rm.net.buffers()], score, rm.batch_size)


def fake_hpsv3(path: str | Path, options: dict, dtype: torch.dtype, mode: FakeTensorMode,
               text_tokens: int = HPSV3_TEXT_TOKENS) -> HPSv3Reward:  # fmt: skip
    """An HPSv3Reward whose network has fake weights under `mode`: Qwen2-VL from its ``config.json``
    (``base=``, the folder's own, or the yaml's model_name_or_path), the head of the checkpoint's yaml
    (``config=``; default the released RankNet head, fp32), the vocabulary the reference resizes to (the
    tokenizer's length with ``<|Reward|>`` when a tokenizer is in the folder, else the config's
    ``vocab_size``), scoring as the adapter does on the planned device (the fake CPU)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = H.read_config(options.get("config"))
    if cfg["lora_enable"]:
        raise RewardModelError("hpsv3: the plan builds a checkpoint without LoRA (lora_enable: false, as released); "
                               f"{options.get('config')} enables it")  # fmt: skip
    base = Q.base_folder(folder, options.get("base"), cfg["model_name_or_path"], "hpsv3", "Qwen2-VL-7B-Instruct")
    config = Q.load_config(base, "hpsv3", "pass hpsv3.base=<Qwen2-VL-7B-Instruct folder> (its config.json)")
    tokenizer = [f for f in (base, folder) if (f / "tokenizer.json").exists() or (f / "tokenizer_config.json").exists()]
    if tokenizer:  # the reference resizes the embeddings to len(tokenizer) once <|Reward|> is added
        tok = Q.load_tokenizer(tokenizer, H.SPECIAL_TOKENS, "hpsv3", H.HINT)
        config.text_config.vocab_size = len(tok)
    hidden = config.text_config.hidden_size
    with torch.device("meta"):
        head = H.reward_head(hidden, cfg)
    net = fake_qwen_net(config, dtype, mode, head, "hpsv3", path, head_fp32=True)
    rm = HPSv3Reward.__new__(HPSv3Reward)
    rm.device, rm.dtype, rm.net, rm._offloaded = torch.device("cpu"), dtype, net, False
    rm.batch_size, rm.config = int(options.get("batch_size", 8)), cfg
    rm.topk, rm.pixels = float(options.get("topk", 0.3)), int(options.get("pixels", H.PIXELS))
    # PIL's resize runs on the host (8-bit frames down, floats back): planned as the torch uint8 path, whose
    # device temporaries are those of one frame too
    rm.resample = "uint8" if options.get("resample", "pil") == "pil" else options["resample"]
    vocab = config.text_config.vocab_size
    rm.special_ids = list(range(vocab - len(H.SPECIAL_TOKENS), vocab))  # <|Reward|>: the vocabulary's last
    rm.inputs = PlanInputs(config, text_tokens, rm.special_ids, "hpsv3")
    rm.prompt = lambda text: text  # type: ignore[method-assign]  (PlanInputs needs no chat text)
    return rm


def plan_hpsv3(path: str, options: dict, dtype: torch.dtype, mode: FakeTensorMode) -> PlannedReward:
    """HPSv3 scores frames: one scoring batch is ``batch_size`` frames (of the first video, or as many as it
    has), each an image of ``pixels`` pixels."""
    return frame_scorer(fake_hpsv3(path, options, dtype, mode, int(options.get("plan_text_tokens", HPSV3_TEXT_TOKENS))),
                        "hpsv3")  # fmt: skip


class PlanTokens:
    """A tokenizer stand-in: every prompt is `tokens` ids (0, the last one the largest: open_clip's EOT, where
    the text is pooled), mask all ones; the shapes the real tokenizer gives a prompt of that length."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def __call__(self, prompts: list[str], **_):
        from transformers import BatchEncoding  # .to(device) as the real tokenizer's output

        ids = torch.tensor([[0] * (self.tokens - 1) + [1]] * len(prompts), dtype=torch.long)
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def frame_scorer(rm, name: str) -> PlannedReward:
    """One scoring batch of a frame-level adapter `rm` (its ``batch_size`` frames, of one video or as many as
    it has) with the token ids real (HostLogic)."""

    def score(videos: torch.Tensor) -> object:
        frames = as_float(videos.flatten(0, 1)[: rm.batch_size])  # on the host, as frame_scores converts them
        with HostLogic():
            return rm._frame_scores(frames, [""] * frames.shape[0])

    return PlannedReward(name, [*rm.net.parameters(), *rm.net.buffers()], score, 1)


def plan_hpsv2(path: str, options: dict, dtype: torch.dtype, mode: FakeTensorMode) -> PlannedReward:
    """HPSv2.1: open_clip's CLIP from ``open_clip_config.json`` (ViT-H-14 without one; no tokenizer needed:
    the text is always the context length, 77 tokens), ``batch_size`` frames (default 16) at 224 x 224."""
    from .models.hpsv2 import HPSv2Reward, OpenCLIP, open_clip_config

    cfg = open_clip_config(Path(path))
    rm = HPSv2Reward.__new__(HPSv2Reward)
    rm.net = fake_module(lambda: OpenCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]), dtype, mode)
    rm.device, rm.dtype, rm._offloaded = torch.device("cpu"), dtype, False
    rm.batch_size, rm.resample = int(options.get("batch_size", 16)), options.get("resample", "float")
    rm.tokenizer = PlanTokens(rm.net.context_length)
    rm.tokenize = lambda prompts: rm.tokenizer(prompts)["input_ids"]  # type: ignore[method-assign]
    return frame_scorer(rm, "hpsv2")


def plan_clip(path: str, options: dict, dtype: torch.dtype, mode: FakeTensorMode) -> PlannedReward:
    """CLIP: a transformers ``CLIPModel`` from ``config.json`` (and ``preprocessor_config.json`` when there),
    ``batch_size`` frames (default 32), prompts of ``plan_text_tokens`` tokens (default the text tower's
    77: the longest; the tokenizer pads to the batch's longest prompt)."""
    from transformers import CLIPConfig, CLIPModel

    from .models.clip import HINT as CLIP_HINT
    from .models.clip import CLIPReward, image_settings

    folder = Path(path)
    need_file(folder / "config.json", "clip", "CLIP config.json", CLIP_HINT)
    config = CLIPConfig.from_pretrained(str(folder), local_files_only=True)
    rm = CLIPReward.__new__(CLIPReward)
    rm.net = fake_module(lambda: CLIPModel(config), dtype, mode)
    rm.device, rm.dtype, rm._offloaded = torch.device("cpu"), dtype, False
    rm.batch_size, rm.resample = int(options.get("batch_size", 32)), options.get("resample", "float")
    rm.logit_scale = bool(options.get("logit_scale", False))
    rm.size, rm.crop, rm.mean, rm.std = image_settings(folder, config.vision_config.image_size)
    rm.max_length = config.text_config.max_position_embeddings
    rm.tokenizer = PlanTokens(int(options.get("plan_text_tokens", rm.max_length)))
    return frame_scorer(rm, "clip")


# model name -> planner(path, options, dtype, fake mode): every built-in adapter (plug-ins are not planned)
REWARD_PLANNERS: dict[str, Callable[[str, dict, torch.dtype, FakeTensorMode], PlannedReward]] = {
    "videoalign": plan_videoalign,
    "hpsv3": plan_hpsv3,
    "hpsv2": plan_hpsv2,
    "clip": plan_clip,
}
