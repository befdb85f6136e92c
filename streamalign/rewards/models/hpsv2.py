"""HPSv2.1 (tgxs002/HPSv2): an open_clip ``ViT-H-14`` fine-tuned on human preferences; score = cosine of the
normalised image and text features, per frame; the video score is the frame mean.

Local layout (nothing is downloaded)::

    <path>/HPS_v2.1_compressed.pt    {"state_dict": open_clip CLIP state dict} (weights_only=True)
    <path>/tokenizer/                the CLIP BPE as a transformers CLIPTokenizer folder (vocab.json +
                                     merges.txt, e.g. from any openai/clip-vit-* copy); or those files in <path>
    <path>/open_clip_config.json     optional: the open_clip model config (embed_dim, vision_cfg, text_cfg);
                                     ViT-H-14's when absent

The towers are written here with open_clip's state-dict names (``visual.conv1``, ``visual.transformer.
resblocks.N.attn.in_proj_weight``, ``token_embedding``, ``text_projection``, ``logit_scale``, ...), GELU,
pre-LN blocks, class-token pooling with ``ln_post`` and ``proj``, text pooled at the EOT token (the
largest id) after ``ln_final``. Image: longest side to 224 with bicubic, centred zero padding, OpenAI-CLIP
normalisation (``preprocess_val`` with ``resize_longest_max``). Text: open_clip's tokenizer pads with 0 to
77 tokens and ends a truncated prompt with EOT; ``CLIPTokenizer`` does the same BPE (its text cleaning
equals open_clip's ftfy + whitespace clean when ``ftfy`` is installed: the ``rewards`` extra).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import preprocess as P
from .base import RewardModel, RewardModelError, read_json, read_tensors, require

VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
HINT = "expected HPS_v2.1_compressed.pt (xswu/HPSv2) and tokenizer/ (CLIP vocab.json + merges.txt)"


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        head_width: int,
        out: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // head_width, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [N, grid**2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenCLIP(nn.Module):
    """open_clip's ``CLIP`` (ViT image tower, causal text transformer) with its state-dict names."""

    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict) -> None:
        super().__init__()
        v, t = vision_cfg, text_cfg
        self.visual = VisionTransformer(
            v.get("image_size", 224),
            v["patch_size"],
            v["width"],
            v["layers"],
            v.get("head_width", 64),
            embed_dim,
            v.get("mlp_ratio", 4.0),
        )
        ctx, width = t.get("context_length", 77), t["width"]
        self.context_length = ctx
        self.transformer = Transformer(width, t["layers"], t["heads"], t.get("mlp_ratio", 4.0))
        self.token_embedding = nn.Embedding(t.get("vocab_size", 49408), width)
        self.positional_embedding = nn.Parameter(torch.zeros(ctx, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask.to(x.dtype)))
        x = x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection
        return F.normalize(x, dim=-1)


def open_clip_config(path: Path) -> dict:
    """``<path>/open_clip_config.json``, or ViT-H-14's when absent."""
    file = path / "open_clip_config.json"
    return read_json(file, "hpsv2", HINT) if file.exists() else VIT_H_14


def clip_tokenizer(folders: list[Path], who: str, hint: str):
    transformers = require("transformers", who)
    for folder in folders:
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            return transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise RewardModelError(f"{who}: no CLIP tokenizer (vocab.json + merges.txt) in {[str(f) for f in folders]}; {hint}")


class HPSv2Reward(RewardModel):
    name = "hpsv2"
    outputs = ("score",)
    frame_level = True

    def __init__(
        self,
        path: str | Path,
        device=None,
        dtype=None,
        batch_size: int = 16,
        resample: str = "float",
        weights: str = "HPS_v2.1_compressed.pt",
    ) -> None:
        super().__init__(device, dtype, batch_size)
        path = Path(path)
        self.resample = self.check_resample(resample)
        cfg = open_clip_config(path)
        sd = read_tensors(path / weights, self.name, HINT, entry="state_dict")
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        self.net = OpenCLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])
        result = self.net.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RewardModelError(
                f"hpsv2: {path / weights} does not match the open_clip config: missing "
                f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
            )
        self.tokenizer = clip_tokenizer([path / "tokenizer", path], self.name, HINT)
        self._place()

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """open_clip's token layout: [SOT] tokens [EOT], truncated to the context with EOT last, 0-padded."""
        ctx = self.net.context_length
        enc = self.tokenizer(prompts, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
        return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, 0)

    def _frame_scores(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        x = P.resize_longest_pad(frames.to(self.device).float(), self.net.visual.image_size, self.resample)
        image = self.net.encode_image(P.normalize(x).to(self.dtype))
        unique = list(dict.fromkeys(prompts))
        text = self.net.encode_text(self.tokenize(unique).to(self.device))[[unique.index(p) for p in prompts]]
        return {"score": (image.float() * text.float()).sum(-1)}
