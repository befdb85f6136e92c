"""Example external reward: CLIP text-image similarity per frame, loaded from a local folder.

Register it (nothing is downloaded; the folder holds a transformers CLIP checkpoint, e.g. a local copy of
openai/clip-vit-base-patch32 with its tokenizer files):

    from streamalign.rewards import register_external
    register_external("clip", "examples/clip_reward.py:make_clip_reward", "/models/clip-vit-b32", frame_level=True)

then use ``Reward("clip")`` or the composite term ``clip=0.5`` like any built-in. HPSv3 or VideoAlign plug
in the same way: a factory ``(path, **kwargs) -> scorer(videos [B, F, 3, H, W] in [0, 1], prompts)``
returning [B] (video-level) or [B, F] (frame-level) scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_clip_reward(path: str, device: str = "cpu", batch_frames: int = 256):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    size = model.config.vision_config.image_size
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Cosine similarity of every frame with its prompt: [B, F]."""
        b, f = videos.shape[:2]
        tok = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        text = F.normalize(_features(model.get_text_features(**tok)), dim=-1)  # [B, D]
        frames = videos.flatten(0, 1).to(device)
        feats = []
        for i in range(0, frames.shape[0], batch_frames):
            x = F.interpolate(frames[i : i + batch_frames], size=(size, size), mode="bicubic", align_corners=False)
            feats.append(_features(model.get_image_features(pixel_values=(x.clamp(0, 1) - mean) / std)))
        image = F.normalize(torch.cat(feats), dim=-1).view(b, f, -1)
        return (image * text[:, None]).sum(-1).cpu()

    return score


def _features(out) -> torch.Tensor:
    """Projected features: a tensor (transformers 4) or the output's pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
