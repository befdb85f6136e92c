"""CLIP text-video similarity from a transformers ``CLIPModel`` folder (e.g. a local openai/clip-vit-large-patch14).

Local layout: ``<path>/config.json``, the weights (``model.safetensors``), the tokenizer files and optionally
``preprocessor_config.json`` (its ``size``/``crop_size``/``image_mean``/``image_std`` are used; without it,
the vision ``image_size`` and the OpenAI-CLIP mean/std).

Preprocessing is ``CLIPImageProcessor``'s geometry on tensors: shortest side to ``size`` (bicubic,
``resample="float"``: torch antialiased bicubic; ``"pil"``: PIL bicubic on 8-bit frames like the processor),
centre crop, normalisation. Score per frame: the cosine of the projected, normalised image and text
features (``logit_scale=True``: times ``exp(logit_scale)``, i.e. CLIP's logits, 100 x cosine for OpenAI
CLIP); the video score is the frame mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import preprocess as P
from .base import RewardModel, RewardModelError, need_file, require

HINT = "expected a local transformers CLIP folder (config.json, model.safetensors, tokenizer files)"


def features(out) -> torch.Tensor:
    """Projected features: a tensor (transformers 4) or the output's pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_settings(path: Path, side: int) -> tuple[int, tuple[int, int], tuple, tuple]:
    """(shortest side, crop (h, w), mean, std) from ``preprocessor_config.json`` in `path`; without it the
    vision tower's `side` and the OpenAI-CLIP mean / std."""
    file = path / "preprocessor_config.json"
    pre = json.loads(file.read_text()) if file.exists() else {}
    size, crop = pre.get("size", side), pre.get("crop_size", side)
    size = size.get("shortest_edge", side) if isinstance(size, dict) else int(size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    return size, crop, tuple(pre.get("image_mean", P.CLIP_MEAN)), tuple(pre.get("image_std", P.CLIP_STD))


class CLIPReward(RewardModel):
    name = "clip"
    outputs = ("score",)
    frame_level = True

    def __init__(
        self,
        path: str | Path,
        device=None,
        dtype=None,
        batch_size: int = 32,
        resample: str = "float",
        logit_scale: bool = False,
    ) -> None:
        super().__init__(device, dtype, batch_size)
        path = Path(path)
        transformers = require("transformers", self.name)
        need_file(path / "config.json", self.name, "CLIP config.json", HINT)
        try:
            self.net = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except OSError as e:
            raise RewardModelError(f"clip: cannot load {path}: {str(e).splitlines()[0]}; {HINT}") from None
        self.size, self.crop, self.mean, self.std = image_settings(path, self.net.config.vision_config.image_size)
        self.logit_scale = logit_scale
        self.resample = self.check_resample(resample)
        self.max_length = self.net.config.text_config.max_position_embeddings
        self._place()

    def _frame_scores(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        x = P.resize_shortest_crop(frames.to(self.device).float(), self.size, self.crop, self.resample)
        x = P.normalize(x, self.mean, self.std).to(self.dtype)
        image = F.normalize(features(self.net.get_image_features(pixel_values=x)).float(), dim=-1)
        unique = list(dict.fromkeys(prompts))
        tok = self.tokenizer(unique, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        text = F.normalize(features(self.net.get_text_features(**tok.to(self.device))).float(), dim=-1)
        text = text[[unique.index(p) for p in prompts]]
        score = (image * text).sum(-1)
        if self.logit_scale:
            score = score * self.net.logit_scale.exp().float()
        return {"score": score}
