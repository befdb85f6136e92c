"""VideoAlign / VideoReward (KwaiVGI/VideoAlign; weights KlingTeam/VideoReward): Qwen2-VL-2B + LoRA + a linear
head read at ``<|VQ_reward|>``, ``<|MQ_reward|>``, ``<|TA_reward|>``.

Local layout (nothing is downloaded)::

    <path>/model_config.json          data_config (fps, num_frames, max_frame_pixels, ...), peft_lora_config,
                                      inference_config, model_config.model_name_or_path
    <path>/checkpoint-<N>/model.pth   the full PEFT-wrapped state dict (read with weights_only=True)
    <path>/checkpoint-<N>/tokenizer/  (or <path>/tokenizer/, or <path> itself) the tokenizer with the 3 tokens
    base=<Qwen2-VL-2B-Instruct>       a folder with its config.json (only the config is read; every weight is
                                      in model.pth); default: <path> if it has config.json, else
                                      model_config.model_name_or_path (a relative one is resolved against <path>)

``preprocess="files"`` (default) follows ``VideoVLMRewardInference.reward`` on video files: frames sampled at
``sample_fps`` (``data_config.fps``, 2.0) from the video's `fps`, or ``num_frames`` of them (the two are
exclusive, per call or at load; a configured ``data_config.num_frames`` is used as the reference uses it,
and a rate given beside it is refused where the reference would ignore it),
``smart_resize`` (min 128*28*28, max ``max_frame_pixels`` = 200704), bicubic antialiased resize of 8-bit
frames (``resample="uint8"``, torchvision on decoded uint8 video). ``preprocess="astrolabe"`` follows
Astrolabe's ``reward_from_frames`` (franklinz233/Astrolabe@35a5347, ``process_wanvideo_tensor``): 10 frames
``linspace(0, T - 1, 10).round()`` and a fixed 336x588 resize of the 8-bit frames, whatever the fps and size.
Then rescale + OpenAI-CLIP normalisation, the ``detailed_special`` prompt in the Qwen2-VL chat template
(system turn, generation prompt), right padding. Outputs ``VQ, MQ, TA`` normalised with the inference
config's means/stds and ``Overall = VQ + MQ + TA`` (the reference API's default; Astrolabe's
``reward_from_frames`` divides that sum by 3), and the same four raw (``*_raw``; AR-CoPO's tables).
``grayscale=True`` converts frames to 3-channel grayscale first, as Astrolabe scores MQ
(``preprocess.grayscale3``: 8-bit levels, torchvision weights, truncated).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..registry import as_float
from . import preprocess as P
from . import qwen2vl as Q
from .base import RewardModel, RewardModelError, read_json, read_tensors
from .prompts import DETAILED_SPECIAL

SPECIAL_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
NORMALISATION = {"VQ": (3.6757, 2.2476), "MQ": (1.1646, 1.3811), "TA": (2.8105, 2.5121)}
HINT = "expected a local copy of KlingTeam/VideoReward (model_config.json, checkpoint-N/model.pth, tokenizer)"
PREPROCESSINGS = ("files", "astrolabe")


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
        num_frames: float | None = None,
        max_pixels: int | None = None,
        min_pixels: int = P.VIDEO_MIN_PIXELS,
        resample: str = "uint8",
        preprocess: str = "files",
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
        if preprocess not in PREPROCESSINGS:
            raise RewardModelError(f"videoalign: preprocess must be one of {PREPROCESSINGS}, got '{preprocess}'")
        if preprocess == "astrolabe" and (sample_fps, num_frames, max_pixels, resample) != (None, None, None, "uint8"):
            raise RewardModelError("videoalign: preprocess=astrolabe fixes the frames (10), the size (336x588) "
                                   "and the 8-bit resize; drop sample_fps, num_frames, max_pixels, resample")
        if sample_fps is not None and num_frames is not None:
            raise RewardModelError("videoalign: sample_fps and num_frames are exclusive (give one)")
        self.preprocess = preprocess
        # the options stand for the config's values; the reference lets a configured num_frames win over fps
        self.num_frames = num_frames if num_frames is not None else data.get("num_frames")
        if sample_fps is not None and self.num_frames is not None:
            raise RewardModelError(f"videoalign: {path}/model_config.json sets num_frames={self.num_frames}, which "
                                   "the reference uses instead of any fps; drop sample_fps (or give num_frames)")
        self.num_frames = None if self.num_frames is None else self._count(self.num_frames)
        self.sample_fps = float(sample_fps or data.get("fps") or 2.0)
        self.max_pixels = int(max_pixels or data.get("max_frame_pixels") or 200704)
        self.min_pixels, self.grayscale = min_pixels, grayscale
        self.resample = self.check_resample(resample)

        ckpt = latest_checkpoint(path, checkpoint_step)
        named = (cfg.get("model_config") or {}).get("model_name_or_path")
        base_dir = Q.base_folder(path, base, named, self.name, "Qwen2-VL-2B-Instruct")
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
    def _count(num_frames) -> float:
        """A frame count as the reference takes it (a number; rounded to a multiple of 2 when sampling)."""
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, float)) or not num_frames > 0:
            raise RewardModelError(f"videoalign: num_frames must be a positive number, got {num_frames!r}")
        return num_frames

    @classmethod
    def reads_levels(cls, options: dict) -> bool:
        """True: the first thing done to a frame is 8-bit quantisation (uint8 input scores as its float)."""
        return options.get("resample", "uint8") in ("uint8", "pil")

    def prompt(self, text: str) -> str:
        """The rendered chat for one prompt (the video is one ``<|video_pad|>`` until expanded)."""
        items = [{"type": "video"}, {"type": "text", "text": DETAILED_SPECIAL.format(text_prompt=text)}]
        return Q.render_chat(self.tokenizer, items)

    def frames_of(self, video: torch.Tensor, fps: float, sample_fps: float | None = None,
                  num_frames: float | None = None) -> list[int]:  # fmt: skip
        """Indices of the frames the reference feeds from a ``T``-frame video at `fps` (per-call `sample_fps` /
        `num_frames`, exclusive, else the loaded ones; see the module doc)."""
        t = video.shape[0]
        if sample_fps is not None and num_frames is not None:
            raise RewardModelError("videoalign: sample_fps and num_frames are exclusive (give one)")
        if self.preprocess == "astrolabe":
            if (sample_fps, num_frames) != (None, None):
                raise RewardModelError("videoalign: preprocess=astrolabe always samples 10 frames; drop sample_fps "
                                       "and num_frames")  # fmt: skip
            return P.uniform_indices(t, P.ASTROLABE_FRAMES)
        if sample_fps is not None and self.num_frames is not None:  # the reference would silently ignore the rate
            raise RewardModelError(f"videoalign: this model samples num_frames={self.num_frames} (its config or "
                                   "load options); a per-call sample_fps would be ignored, so it is refused")
        num_frames = self.num_frames if num_frames is None else self._count(num_frames)
        try:
            if num_frames is not None:  # the reference: a number of frames (given or configured) wins over a rate
                return P.uniform_indices(t, P.count_nframes(t, num_frames))
            return P.uniform_indices(t, P.smart_nframes(t, fps, self.sample_fps if sample_fps is None else sample_fps))
        except ValueError as e:
            raise RewardModelError(f"videoalign: {e}") from None

    def sample(self, video: torch.Tensor, fps: float, sample_fps: float | None = None,
               num_frames: float | None = None) -> torch.Tensor:  # fmt: skip
        """The frames the reference feeds: [n, 3, h, w] (uint8 stays uint8), in gray if asked (the reference
        grays the whole video first; per pixel, so graying the sampled frames gives the same)."""
        frames = video[self.frames_of(video, fps, sample_fps, num_frames)]
        return P.grayscale3(frames) if self.grayscale else frames

    def size_of(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the resized frames."""
        if self.preprocess == "astrolabe":
            return P.ASTROLABE_SIZE
        return P.smart_resize(height, width, self.inputs.factor, self.min_pixels, self.max_pixels)

    @torch.no_grad()
    def __call__(self, videos: torch.Tensor, prompts, fps: float = 16.0, sample_fps: float | None = None,
                 num_frames: float | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """{output: float32 [B]}; `sample_fps` / `num_frames` (exclusive) as in the reference's ``reward()``."""
        if sample_fps is not None or num_frames is not None:
            self.frames_of(videos[0], fps, sample_fps, num_frames)  # a bad choice fails before any forward
        return self.score_batches(videos, prompts, fps, sample_fps=sample_fps, num_frames=num_frames)

    def _score(self, videos: torch.Tensor, prompts: list[str], fps: float, sample_fps: float | None = None,
               num_frames: float | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        patches = []
        for video in videos:
            frames = as_float(self.sample(video, fps, sample_fps, num_frames).to(self.device))
            patches.append(self.inputs.frames(frames, self.size_of(*frames.shape[-2:]), self.resample))
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
