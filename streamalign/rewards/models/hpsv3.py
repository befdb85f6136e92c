"""HPSv3 (MizzenAI/HPSv3, PyPI ``hpsv3`` 1.0.0): Qwen2-VL-7B-Instruct + a RankNet head read at ``<|Reward|>``.

Local layout (nothing is downloaded)::

    <path>/HPSv3.safetensors        the full state dict (transformers-4.45 key names are remapped)
    base=<Qwen2-VL-7B-Instruct>     config.json + tokenizer files (weights not read: all are in
                                    HPSv3.safetensors); default: <path> itself

Each frame is scored as one image, as ``HPSv3RewardInferencer.reward`` scores a picture: ``smart_resize``
with min = max pixels = 200704 (480x832 -> 336x588), PIL bicubic on 8-bit RGB (``resample="pil"``, the
image-path inference; ``"float"``/``"uint8"`` use torch), rescale + OpenAI-CLIP normalisation, the user turn
``INSTRUCTION.format(text_prompt=p) + suffix`` after the image in the chat template with generation prompt,
right padding; the head ``Linear(h, 1024)-ReLU-Dropout(0.05)-Linear(1024, 16)-ReLU-Linear(16, 2)`` runs in
fp32 and gives (mu, sigma): the score is mu. The video score is the mean of the best 30% of frames
(Astrolabe), ``topk`` to change it; ``frame_scores`` gives the per-frame mu.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import preprocess as P
from . import qwen2vl as Q
from .base import RewardModel, RewardModelError, read_tensors
from .prompts import HPSV3_INSTRUCTION, HPSV3_SUFFIX

SPECIAL_TOKENS = ["<|Reward|>"]
PIXELS = 256 * 28 * 28  # 200704: min_pixels = max_pixels
HINT = "expected HPSv3.safetensors (MizzenAI/HPSv3) and base=<local Qwen2-VL-7B-Instruct folder>"


def ranknet_head(hidden: int) -> nn.Sequential:
    """The reference's default ``rm_head`` (keys 0, 3, 5)."""
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(), nn.Linear(16, 2)
    )


class HPSv3Reward(RewardModel):
    name = "hpsv3"
    outputs = ("score",)
    frame_level = True

    def __init__(
        self,
        path: str | Path,
        base: str | Path | None = None,
        device=None,
        dtype=None,
        batch_size: int = 8,
        topk: float = 0.3,
        resample: str = "pil",
        pixels: int = PIXELS,
        weights: str = "HPSv3.safetensors",
    ) -> None:
        super().__init__(device, dtype, batch_size)
        path = Path(path)
        file = path if path.is_file() else path / weights
        base_dir = Path(base) if base is not None else (path if path.is_dir() else path.parent)
        if not 0 < topk <= 1:
            raise RewardModelError(f"hpsv3: topk must be a fraction in (0, 1], got {topk}")
        self.topk, self.pixels = topk, pixels
        self.resample = self.check_resample(resample)
        config = Q.load_config(base_dir, self.name, "pass base=<local Qwen2-VL-7B-Instruct folder>")
        sd = Q.remap_keys(read_tensors(file, self.name, HINT, entry=None))
        if "rm_head.0.weight" not in sd:
            raise RewardModelError(f"hpsv3: {file} has no rm_head.0.weight (not an HPSv3 RankNet checkpoint)")
        head = ranknet_head(sd["rm_head.0.weight"].shape[1])
        self.net = Q.build(config, sd, head, self.name, file, head_fp32=True)
        self.tokenizer = Q.load_tokenizer([base_dir, path], SPECIAL_TOKENS, self.name, HINT)
        self.special_ids = self.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        if max(self.special_ids) >= config.text_config.vocab_size:
            raise RewardModelError(f"hpsv3: <|Reward|> id {self.special_ids} exceeds the checkpoint's vocabulary")
        self.inputs = Q.QwenInputs(self.tokenizer, config, self.name)
        self._place()

    def _place(self) -> None:
        super()._place()
        self.net.rm_head.float()  # the reference keeps the head in fp32

    def prompt(self, text: str) -> str:
        items = [{"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=text) + HPSV3_SUFFIX}]
        return Q.render_chat(self.tokenizer, items)

    def aggregate(self, frame_scores: torch.Tensor) -> torch.Tensor:
        return P.topk_mean(frame_scores, self.topk)

    def _frame_scores(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        frames = frames.to(self.device).float()
        size = P.smart_resize(*frames.shape[-2:], self.inputs.factor, self.pixels, self.pixels)
        patches = [self.inputs.frames(f[None], size, self.resample) for f in frames]
        ids, mask, pixels, grid, token = self.inputs.batch(
            [self.prompt(p) for p in prompts], patches, "image", self.device
        )
        hidden = self.net.hidden_states(ids, mask, pixels, grid, token)
        out = self.net.head(Q.pool_special(hidden, ids, self.special_ids, self.name)[:, 0])  # [N, 2]
        return {"score": out[:, 0]}
