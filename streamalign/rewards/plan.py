"""Reward models in ``streamalign plan``: each declared model built from its own config on fake tensors (no
weights read: a folder with its configs is enough), its weights and the peak of one scoring batch measured
by the adapter's own scoring code (docs/planner-rewards.md).

VideoAlign: ``model_config.json`` and the Qwen2-VL ``config.json`` (``base=`` or the folder's own), LoRA
(``peft_lora_config.lora_r``) on every language-model linear layer as KlingTeam/VideoReward trained it,
the 3-token reward head. The scoring batch runs :meth:`VideoAlignReward._score` on ``batch_size`` videos
of the run's frames and resolution, with token ids standing in for the tokenizer's: the video tokens the
frame sampling and ``smart_resize`` give, plus ``text_tokens`` of chat and prompt (the three reward tokens
last).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..models.memory import HostLogic, fake_module
from ..plan import PlannedReward, register_reward_planner
from .models import preprocess as P
from .models import qwen2vl as Q
from .models.base import read_json
from .models.videoalign import HINT, SPECIAL_TOKENS, VideoAlignReward

PLAN_TEXT_TOKENS = 320  # chat template + the detailed_special prompt (~250 Qwen2 tokens) + a long prompt
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
    from transformers import Qwen2VLModel

    model = fake_module(lambda: Qwen2VLModel(config), dtype, mode)
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    r = peft_cfg.get("lora_r") if peft_cfg.get("lora_enable", True) else None
    out_dim = int((cfg.get("model_config") or {}).get("output_dim", 1))
    with mode:
        if r:
            for name, mod in model.language_model.named_modules():
                if name.startswith("layers.") and name.endswith(LORA_TARGETS):
                    key = f"model.language_model.{name}"
                    for leaf in ("weight", "bias"):
                        if getattr(mod, leaf, None) is not None:
                            sd[f"{key}.base_layer.{leaf}"] = sd.pop(f"{key}.{leaf}")
                    sd[f"{key}.lora_A.default.weight"] = torch.empty(r, mod.in_features, dtype=dtype)
                    sd[f"{key}.lora_B.default.weight"] = torch.empty(mod.out_features, r, dtype=dtype)
        sd["rm_head.weight"] = torch.empty(out_dim, config.text_config.hidden_size, dtype=dtype)
    head = torch.nn.Linear(config.text_config.hidden_size, out_dim, bias=False, dtype=dtype, device="meta")
    # the adapter's own build (peft injection on the meta device, then the fake weights assigned), outside the
    # fake mode: peft moves its new layers to the base layer's (meta) device, which a fake mode cannot swap
    net = Q.build(config, sd, head, "videoalign", path, lora_alpha=peft_cfg.get("lora_alpha"),
                  use_rslora=bool(peft_cfg.get("use_rslora")))  # fmt: skip
    with mode:
        for sub in net.modules():  # the rotary buffers build made real: fake ones, cast as the adapter's .to()
            for name, b in sub._buffers.items():
                if b is not None and not isinstance(b, FakeTensor):
                    b = mode.from_tensor(b)
                    sub._buffers[name] = b.to(dtype) if b.is_floating_point() else b
        net.eval().requires_grad_(False)
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


register_reward_planner("videoalign", plan_videoalign)
