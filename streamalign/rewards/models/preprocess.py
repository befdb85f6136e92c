"""Frame preprocessing of the reward-model references, on tensors ``[N, C, H, W]`` (float in [0, 1]).

What each reference does, and how it is reproduced here (torch only; torchvision is not needed):

- Frame sampling (VideoAlign ``vision_process.smart_nframes`` + uniform sampling): ``n = T / video_fps *
  sample_fps``, clamped to ``[ceil2(4), floor2(min(768, T))]``, then rounded to a multiple of 2
  (``round(n / 2) * 2``, Python's round-half-to-even), capped at ``T``; indices
  ``torch.linspace(0, T - 1, n).round()``. Fewer than 2 frames is an error, as in the reference.
- ``smart_resize`` (Qwen2-VL): both sides rounded to a multiple of 28; if the area exceeds max_pixels,
  ``floor`` of ``side / sqrt(h w / max_pixels)`` to a multiple of 28; below min_pixels, ``ceil`` of
  ``side * sqrt(min_pixels / (h w))``; aspect ratio above 200 is an error.
- Bicubic resampling: torchvision's ``functional.resize(tensor, size, BICUBIC, antialias=True)`` casts to
  float32, calls ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
  antialias=True)``, and for uint8 input clamps to [0, 255], rounds and casts back. ``resize(...,
  mode="uint8")`` reproduces that on frames quantised to 8 bits (VideoAlign decodes uint8 video with
  decord, resizes the uint8 tensor, then ``.float()``); ``mode="float"`` is the same interpolation on
  float frames; ``mode="pil"`` is PIL's ``Image.resize(BICUBIC)`` on uint8 frames (HPSv3's image-path
  inference; PIL rounds between its two passes, so it differs from torch by up to ~1/255).
- Frame count (VideoAlign ``reward(..., num_frames=N)``, ``smart_nframes`` with ``nframes``): ``round(N / 2) *
  2``, capped at ``T``; fewer than 2 is an error. ``num_frames`` and ``sample_fps`` are exclusive.
- Astrolabe's ``process_wanvideo_tensor`` (``reward_from_frames``): 10 frames ``linspace(0, T - 1, 10).round()``
  whatever the frame rate, then a fixed 336x588 resize (bicubic, antialiased, on uint8 frames).
- Grayscale as Astrolabe's ``VideoAlignScorer`` computes it: float frames -> uint8 by ``(v * 255).round()
  .clamp(0, 255)``, then torchvision ``rgb_to_grayscale(v_uint8, num_output_channels=3)``: ``0.2989 R + 0.587 G
  + 0.114 B`` in float32 on the uint8 levels, truncated back to uint8 (``.to(torch.uint8)``), on 3 channels.
- OpenAI-CLIP mean/std normalisation (Qwen2-VL processor, CLIP, HPSv2).
- HPSv2 ``ResizeMaxSize``: longest side to 224 (``round(side * 224 / max(h, w))``), bicubic, then zero
  padding ``[left, top, right, bottom] = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]`` (zeros in [0, 1]
  space, before normalisation).
- Top-k frame aggregation: the mean of the best ``k = max(1, ceil(frac * F))`` frames, the rule of the
  project's registry (``Reward(aggregate="top")``). Astrolabe's "mean of the top 30% of frames" does not
  state its rounding; this rule is ours.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_FACTOR = 28
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
MAX_RATIO = 200
VIDEO_MIN_PIXELS = 128 * 28 * 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
RESIZE_MODES = ("float", "uint8", "pil")
ASTROLABE_FRAMES = 10  # process_wanvideo_tensor: nframes = 10
ASTROLABE_SIZE = (336, 588)  # process_wanvideo_tensor: resized_height, resized_width


def round_by_factor(x: float, factor: int) -> int:
    return round(x / factor) * factor


def ceil_by_factor(x: float, factor: int) -> int:
    return math.ceil(x / factor) * factor


def floor_by_factor(x: float, factor: int) -> int:
    return math.floor(x / factor) * factor


def smart_nframes(
    total: int,
    video_fps: float,
    sample_fps: float = 2.0,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """Number of frames VideoAlign samples from `total` frames at `video_fps` (see the module doc)."""
    if total < 1 or video_fps <= 0 or sample_fps <= 0:
        raise ValueError(f"need total >= 1 frames and positive fps, got {total} frames, {video_fps}/{sample_fps} fps")
    lo = ceil_by_factor(min_frames, FRAME_FACTOR)
    hi = floor_by_factor(min(max_frames, total), FRAME_FACTOR)
    n = round_by_factor(min(max(total / video_fps * sample_fps, lo), hi), FRAME_FACTOR)
    n = min(n, total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"a {total}-frame video gives {n} sampled frames; VideoAlign needs at least {FRAME_FACTOR}")
    return n


def count_nframes(total: int, num_frames: float) -> int:
    """Number of frames VideoAlign samples when asked for `num_frames` (``smart_nframes`` with ``nframes``)."""
    if total < 1 or isinstance(num_frames, bool) or not isinstance(num_frames, (int, float)) or not num_frames > 0:
        raise ValueError(f"need total >= 1 frames and a positive num_frames, got {total} and {num_frames!r}")
    n = min(round_by_factor(num_frames, FRAME_FACTOR), total)
    if not FRAME_FACTOR <= n <= total:
        raise ValueError(f"num_frames={num_frames} of a {total}-frame video gives {n}; VideoAlign needs at least "
                         f"{FRAME_FACTOR}")  # fmt: skip
    return n


def uniform_indices(total: int, n: int) -> list[int]:
    """``torch.linspace(0, T - 1, n).round()`` as a list (uniform sampling in every reference)."""
    return torch.linspace(0, total - 1, n).round().long().tolist()


def sample_indices(
    total: int, video_fps: float, sample_fps: float | None = 2.0, num_frames: float | None = None
) -> list[int]:
    """VideoAlign's uniformly sampled frame indices: ``num_frames`` (the frame count rule) or ``sample_fps``
    (the rate rule), never both."""
    if num_frames is not None and sample_fps is not None:
        raise ValueError("sample_fps and num_frames are exclusive (VideoAlign: 'fps and num_frames cannot be set "
                         "at the same time')")  # fmt: skip
    if num_frames is not None:
        return uniform_indices(total, count_nframes(total, num_frames))
    return uniform_indices(total, smart_nframes(total, video_fps, 2.0 if sample_fps is None else sample_fps))


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
) -> tuple[int, int]:
    """Qwen2-VL's (height, width): multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_RATIO}, got {max(height, width) / min(height, width)}")
    h = max(factor, round_by_factor(height, factor))
    w = max(factor, round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = floor_by_factor(height / beta, factor), floor_by_factor(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = ceil_by_factor(height * beta, factor), ceil_by_factor(width * beta, factor)
    return h, w


def to_uint8_levels(frames: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] -> float 0..255 integer levels (what an 8-bit decoded video holds); uint8 frames
    -> the same levels as floats."""
    if frames.dtype == torch.uint8:
        return frames.float()
    return (frames * 255).round().clamp(0, 255)


def resize(frames: torch.Tensor, size: tuple[int, int], mode: str = "float") -> torch.Tensor:
    """Bicubic, antialiased resize of ``[N, C, H, W]`` float frames in [0, 1] to ``size = (h, w)``.

    ``float``: torch's antialiased bicubic on the float frames (values may overshoot [0, 1], as in
    torchvision on float tensors); ``uint8``: frames quantised to 8 bits first and the result rounded and
    clamped like torchvision on uint8 tensors; ``pil``: PIL ``BICUBIC`` on 8-bit frames. Output in [0, 1]
    scale (``uint8``/``pil``: multiples of 1/255).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got '{mode}'")
    h, w = size
    if mode == "pil":
        return _resize_pil(frames, (h, w))
    x = to_uint8_levels(frames) if mode == "uint8" else frames.float()
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    if mode == "uint8":
        x = x.clamp(0, 255).round() / 255
    return x


def _resize_pil(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    h, w = size
    levels = to_uint8_levels(frames).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for frame in levels:
        img = Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame)
        arr = np.asarray(img.resize((w, h), Image.BICUBIC))
        out.append(torch.from_numpy(arr.copy()).reshape(h, w, -1))
    return torch.stack(out).permute(0, 3, 1, 2).to(frames.device, torch.float32) / 255


def grayscale3(frames: torch.Tensor) -> torch.Tensor:
    """Astrolabe's 3-channel grayscale of RGB frames ``[..., 3, H, W]`` (see the module doc): uint8 in ->
    uint8 out; float in [0, 1] in -> the truncated gray levels / 255 (float32), so a later 8-bit step reads
    exactly the levels the reference computed."""
    levels = to_uint8_levels(frames)  # float32 0..255 integer levels, as torchvision sees the uint8 tensor
    r, g, b = levels.unbind(-3)
    gray = (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).to(torch.uint8)  # truncates
    gray = gray.unsqueeze(-3).expand(frames.shape)
    return gray if frames.dtype == torch.uint8 else gray.float() / 255


def normalize(frames: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``[..., 3, H, W]`` frames."""
    m = torch.tensor(mean, device=frames.device, dtype=frames.dtype).view(3, 1, 1)
    s = torch.tensor(std, device=frames.device, dtype=frames.dtype).view(3, 1, 1)
    return (frames - m) / s


def resize_longest_pad(frames: torch.Tensor, size: int = 224, mode: str = "float") -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize``: longest side to `size`, bicubic, centred zero padding to size x size.

    The reference skips the resize (and the padding) when the longest side already equals `size`; here a
    non-square frame is padded anyway (the reference would hand the ViT a non-square image and fail)."""
    h, w = frames.shape[-2:]
    scale = size / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        frames = resize(frames, (nh, nw), mode)
    else:
        nh, nw = h, w
    ph, pw = size - nh, size - nw
    return F.pad(frames, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


def resize_shortest_crop(frames: torch.Tensor, size: int, crop: tuple[int, int], mode: str = "float") -> torch.Tensor:
    """CLIPImageProcessor geometry: shortest side to `size` (the long side ``int(size * long / short)``),
    then a centred ``crop = (h, w)`` with ``top = (H - h) // 2``, ``left = (W - w) // 2``."""
    h, w = frames.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    if (nh, nw) != (h, w):
        frames = resize(frames, (nh, nw), mode)
    ch, cw = crop
    top, left = (nh - ch) // 2, (nw - cw) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {crop} is larger than the resized frame {(nh, nw)}")
    return frames[..., top : top + ch, left : left + cw]


def topk_indices(scores: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """Indices ``[B, k]`` of the best ``k = max(1, ceil(frac * F))`` of the frame scores ``[B, F]``."""
    if not 0 < frac <= 1:
        raise ValueError(f"top-k fraction must lie in (0, 1], got {frac}")
    return scores.topk(max(1, math.ceil(frac * scores.shape[1])), dim=1).indices


def topk_mean(scores: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """Mean of the best ``max(1, ceil(frac * F))`` of the frame scores ``[B, F]`` -> ``[B]``."""
    return scores.gather(1, topk_indices(scores, frac)).mean(1)
