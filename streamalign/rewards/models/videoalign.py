"""VideoAlign / VideoReward (KwaiVGI/VideoAlign; weights KlingTeam/VideoReward): Qwen2-VL-2B + LoRA + a linear
head read at ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``.

Local layout (nothing is downloaded)::

    <path>/model_config.json          data_config (fps, max_frame_pixels, ...), peft_lora_config, inference_config
    <path>/checkpoint-<N>/model.pth   the full PEFT-wrapped state dict (read with weights_only=True)
    <path>/checkpoint-<N>/tokenizer/  (or <path>/tokenizer/, or <path> itself) the tokenizer with the 3 tokens
    base=<Qwen2-VL-2B-Instruct>       a folder with its config.json (only the config is read; every weight is
                                      in model.pth); default: <path> if it has config.json, else
                                      model_config.model_name_or_path if that is a local folder

Scoring follows ``VideoVLMRewardInference.reward``: frames sampled at ``data_config.fps`` (2.0) from the
video's `fps`, ``smart_resize`` (min 128*28*28, max ``max_frame_pixels`` = 200704), bicubic antialiased
resize of 8-bit frames (``resample="uint8"``, torchvision on decoded uint8 video), rescale + OpenAI-CLIP
normalisation, the ``detailed_special`` prompt in the Qwen2-VL chat template (system turn, generation
prompt), right padding. Outputs ``VQ, MQ, TA`` normalised with the inference config's means/stds and
``Overall = VQ + MQ + TA`` (the reference API's default), and the same four raw (``*_raw``; AR-CoPO's tables).
``grayscale=True`` converts frames to 3-channel grayscale first (Astrolabe scores MQ that way).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import preprocess as P
from . import qwen2vl as Q
from .base import RewardModel, RewardModelError, read_json, read_tensors
from .prompts import DETAILED_SPECIAL

SPECIAL_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
NORMALISATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
HINT = "expected a local copy of KlingTeam/VideoReward (model_config.json, checkpoint-N/model.pth, tokenizer)"


def latest_checkpoint(path: Path, step: int | None) -> Path:
    """``checkpoint-<step>``, or the highest-numbered one (the reference's default)."""
    ckpts = sorted(
        (p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if step is not None:
        ckpts = [p for p in ckpts if p.name == f"checkpoint-{step}"]
    if not ckpts:
        which = f"checkpoint-{step}" if step is not None else "checkpoint-<N>"
        raise RewardModelError(f"videoalign: no {which}/model.pth under {path}; {HINT}")
    return ckpts[-1]


class VideoAlignReward(RewardModel):
    name = "videoalign"
    outputs = ("VQ", "MQ", "TA", "Overall", "VQ_raw", "MQ_raw", "TA_raw", "Overall_raw")
    frame_level = False

    def __init__(
        self,
        path: str | Path,
        base: str | Path | None = None,
        device=None,
        dtype=None,
        batch_size: int = 2,
        checkpoint_step: int | None = None,
        grayscale: bool = False,
        sample_fps: float | None = None,
        max_pixels: int | None = None,
        min_pixels: int = P.VIDEO_MIN_PIXELS,
        resample: str = "uint8",
    ) -> None:
        super().__init__(device, dtype, batch_size)
        path = Path(path)
        cfg = read_json(path / "model_config.json", self.name, HINT)
        data, peft_cfg = cfg.get("data_config", {}), cfg.get("peft_lora_config", {})
        if data.get("prompt_template_type", "detailed_special") != "detailed_special":
            raise RewardModelError(
                f"videoalign: {path}/model_config.json uses template "
                f"'{data['prompt_template_type']}'; only 'detailed_special' is implemented"
            )
        inference = cfg.get("inference_config") or {}
        self.norm = {
            k: (inference.get(f"{k}_mean", m), inference.get(f"{k}_std", s)) for k, (m, s) in NORMALISATION.items()
        }
        self.sample_fps = float(sample_fps or data.get("fps") or 2.0)
        self.max_pixels = int(max_pixels or data.get("max_frame_pixels") or 200704)
        self.min_pixels, self.grayscale = min_pixels, grayscale
        self.resample = self.check_resample(resample)

        ckpt = latest_checkpoint(path, checkpoint_step)
        base_dir = self._base_dir(path, base, cfg)
        base_hint = "pass base=<local Qwen2-VL-2B-Instruct folder> (only its config.json is read)"
        config = Q.load_config(base_dir, self.name, base_hint)
        sd = Q.remap_keys(read_tensors(ckpt / "model.pth", self.name, HINT))
        head = sd.get("rm_head.weight")
        if head is None:
            raise RewardModelError(f"videoalign: {ckpt / 'model.pth'} has no rm_head.weight; {HINT}")
        rm_head = nn.Linear(head.shape[1], head.shape[0], bias=False)
        self.net = Q.build(
            config,
            sd,
            rm_head,
            self.name,
            ckpt / "model.pth",
            lora_alpha=peft_cfg.get("lora_alpha"),
            use_rslora=bool(peft_cfg.get("use_rslora")),
        )
        self.tokenizer = Q.load_tokenizer(
            [ckpt / "tokenizer", path / "tokenizer", path, base_dir], SPECIAL_TOKENS, self.name, HINT
        )
        self.special_ids = self.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        if max(self.special_ids) >= config.text_config.vocab_size:
            raise RewardModelError(
                f"videoalign: reward token ids {self.special_ids} exceed the checkpoint's vocabulary"
            )
        self.inputs = Q.QwenInputs(self.tokenizer, config, self.name)
        self._place()

    @staticmethod
    def _base_dir(path: Path, base, cfg: dict) -> Path:
        if base is not None:
            return Path(base)
        if (path / "config.json").exists():
            return path
        named = (cfg.get("model_config") or {}).get("model_name_or_path")
        if named and Path(named).is_dir():
            return Path(named)
        raise RewardModelError(
            f"videoalign: no Qwen2-VL config.json in {path} and model_name_or_path={named!r} is not a local folder; "
            "pass base=<local Qwen2-VL-2B-Instruct folder> (only its config.json is read)"
        )

    def prompt(self, text: str) -> str:
        """The rendered chat for one prompt (the video is one ``<|video_pad|>`` until expanded)."""
        items = [{"type": "video"}, {"type": "text", "text": DETAILED_SPECIAL.format(text_prompt=text)}]
        return Q.render_chat(self.tokenizer, items)

    def sample(self, video: torch.Tensor, fps: float) -> torch.Tensor:
        """The frames the reference feeds: [n, 3, h, w] in [0, 1], grayscale first if asked."""
        if self.grayscale:
            video = P.grayscale3(video)
        idx = P.sample_indices(video.shape[0], fps, self.sample_fps)
        return video[idx]

    def _score(self, videos: torch.Tensor, prompts: list[str], fps: float) -> dict[str, torch.Tensor]:
        patches = []
        for video in videos:
            frames = self.sample(video.to(self.device).float(), fps)
            size = P.smart_resize(*frames.shape[-2:], self.inputs.factor, self.min_pixels, self.max_pixels)
            patches.append(self.inputs.frames(frames, size, self.resample))
        ids, mask, pixels, grid, token = self.inputs.batch(
            [self.prompt(p) for p in prompts], patches, "video", self.device
        )
        hidden = self.net.hidden_states(ids, mask, pixels, grid, token)
        logits = self.net.head(Q.pool_special(hidden, ids, self.special_ids, self.name)).float()  # [B, 3, out]
        raw = logits.diagonal(dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]
        out = {}
        for i, k in enumerate(("VQ", "MQ", "TA")):
            mean, std = self.norm[k]
            out[f"{k}_raw"] = raw[:, i]
            out[k] = (raw[:, i] - mean) / std
        out["Overall"] = out["VQ"] + out["MQ"] + out["TA"]
        out["Overall_raw"] = out["VQ_raw"] + out["MQ_raw"] + out["TA_raw"]
        return out
