"""HPSv3 (MizzenAI/HPSv3, PyPI ``hpsv3`` 1.0.0): Qwen2-VL-7B-Instruct + a RankNet head read at ``<|Reward|>``.

Local layout (nothing is downloaded)::

    <path>/HPSv3.safetensors        the full state dict (transformers-4.45 key names are remapped)
    config=<HPSv3_7B.yaml>          optional: the checkpoint's training yaml (``HPSv3RewardInferencer``'s
                                    config_path); default: the package's ``hpsv3/config/HPSv3_7B.yaml`` values
    base=<Qwen2-VL-7B-Instruct>     config.json + tokenizer files (weights not read: all are in
                                    HPSv3.safetensors); default: <path> if it has config.json, else the
                                    yaml's model_name_or_path resolved against <path>

Each frame is scored as one image, as ``HPSv3RewardInferencer.reward`` scores a picture: ``smart_resize``
with min = max pixels = 200704 (480x832 -> 336x588; the inferencer fixes these whatever the yaml says), PIL
bicubic on 8-bit RGB (``resample="pil"``, the image-path inference; ``"float"``/``"uint8"`` use torch),
rescale + OpenAI-CLIP normalisation, the user turn ``INSTRUCTION.format(text_prompt=p) + suffix`` after the
image in the chat template with generation prompt, right padding; the head (the yaml's ``rm_head_type``,
``rm_head_kwargs``, ``output_dim``; by default ``Linear(h, 1024)-ReLU-Dropout(0.05)-Linear(1024, 16)-ReLU-
Linear(16, 2)``) runs in fp32 and gives (mu, sigma): ``score`` is mu, ``sigma`` the uncertainty beside it.
The video score is the mean of mu over the best 30% of frames (Astrolabe), ``topk`` to change it, and the
video sigma the mean sigma of those same frames; ``frame_scores`` gives both per frame.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import preprocess as P
from . import qwen2vl as Q
from .base import RewardModel, RewardModelError, need_file, read_tensors
from .prompts import HPSV3_INSTRUCTION, HPSV3_SUFFIX

SPECIAL_TOKENS = ["<|Reward|>"]
PIXELS = 256 * 28 * 28  # 200704: min_pixels = max_pixels
HINT = "expected HPSv3.safetensors (MizzenAI/HPSv3) and base=<local Qwen2-VL-7B-Instruct folder>"
# the model keys of hpsv3/config/HPSv3_7B.yaml (the inferencer's default config_path)
RELEASED = {"model_name_or_path": "Qwen/Qwen2-VL-7B-Instruct", "rm_head_type": "ranknet", "rm_head_kwargs": None,
            "output_dim": 2, "use_special_tokens": True, "reward_token": "special", "lora_enable": False,
            "lora_alpha": 1024, "use_rslora": False}  # fmt: skip
# what a yaml leaves out: the dataclass defaults of hpsv3.utils.parser (ModelConfig, PEFTLoraConfig)
PARSER_DEFAULTS = {"model_name_or_path": None, "rm_head_type": "default", "rm_head_kwargs": None, "output_dim": 1,
                   "use_special_tokens": False, "reward_token": "last", "lora_enable": False, "lora_alpha": 32,
                   "use_rslora": False}  # fmt: skip


def read_config(file: Path | None) -> dict:
    """The model keys of an HPSv3 training yaml (missing keys: the parser's defaults); None: the released one."""
    if file is None:
        return dict(RELEASED)
    import yaml

    need_file(Path(file), "hpsv3", "config yaml", "give config=<the checkpoint's HPSv3_7B.yaml>")
    try:
        raw = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RewardModelError(f"hpsv3: cannot read {file}: {e}") from None
    if not isinstance(raw, dict):
        raise RewardModelError(f"hpsv3: {file} is not a YAML mapping of the reference's config keys")
    cfg = {k: raw.get(k, v) for k, v in PARSER_DEFAULTS.items()}
    if not cfg["use_special_tokens"]:  # True forces the 'special' pooling in the reference, whatever reward_token
        raise RewardModelError(f"hpsv3: {file} has use_special_tokens={cfg['use_special_tokens']} (pooling "
                               f"{cfg['reward_token']!r}); only the <|Reward|> special-token pooling is implemented")
    if cfg["rm_head_type"] not in ("default", "ranknet") or int(cfg["output_dim"]) < 1:
        raise RewardModelError(f"hpsv3: {file}: rm_head_type must be default or ranknet and output_dim >= 1, got "
                               f"{cfg['rm_head_type']!r}, {cfg['output_dim']!r}")  # fmt: skip
    return cfg


def ranknet_head(hidden: int, output_dim: int = 2) -> nn.Sequential:
    """The reference's ``ranknet`` ``rm_head`` without ``rm_head_kwargs`` (keys 0, 3, 5)."""
    return nn.Sequential(
        nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
        nn.Linear(16, output_dim),
    )  # fmt: skip


def reward_head(hidden: int, cfg: dict) -> nn.Module:
    """``rm_head`` as ``Qwen2VLRewardModelBT.__init__`` builds it from ``rm_head_type``, ``rm_head_kwargs``
    (``num_layers`` 3, ``hidden_size``, ``dropout`` 0.1, ``bias`` False) and ``output_dim``."""
    out = int(cfg["output_dim"])
    if cfg["rm_head_type"] == "default":
        return nn.Linear(hidden, out, bias=False)
    kw = cfg["rm_head_kwargs"]
    if kw is None:
        return ranknet_head(hidden, out)
    n, width, p = kw.get("num_layers", 3), kw["hidden_size"], kw.get("dropout", 0.1)
    head = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(p))
    for layer in range(1, n):
        if layer < n - 1:
            head.add_module(f"layer_{layer}", nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Dropout(p)))
        else:
            head.add_module("output_layer", nn.Linear(width, out, bias=kw.get("bias", False)))
    return head


class HPSv3Reward(RewardModel):
    name = "hpsv3"
    outputs = ("score", "sigma")
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
        config: str | Path | None = None,
    ) -> None:
        super().__init__(device, dtype, batch_size)
        path = Path(path)
        file = path if path.is_file() else path / weights
        folder = path if path.is_dir() else path.parent
        if not 0 < topk <= 1:
            raise RewardModelError(f"hpsv3: topk must be a fraction in (0, 1], got {topk}")
        self.topk, self.pixels = topk, pixels
        self.resample = self.check_resample(resample)
        self.config = read_config(config)
        base_dir = Q.base_folder(folder, base, self.config["model_name_or_path"], self.name, "Qwen2-VL-7B-Instruct")
        qwen = Q.load_config(base_dir, self.name, "pass base=<local Qwen2-VL-7B-Instruct folder>")
        sd = Q.remap_keys(read_tensors(file, self.name, HINT, entry=None))
        first = "rm_head.weight" if self.config["rm_head_type"] == "default" else "rm_head.0.weight"
        if first not in sd:
            raise RewardModelError(f"hpsv3: {file} has no {first} (not an HPSv3 {self.config['rm_head_type']} "
                                   "checkpoint; give config=<its yaml>)")  # fmt: skip
        head = reward_head(sd[first].shape[1], self.config)
        lora = self.config if self.config["lora_enable"] else {}
        self.net = Q.build(qwen, sd, head, self.name, file, head_fp32=True, lora_alpha=lora.get("lora_alpha"),
                           use_rslora=bool(lora.get("use_rslora")))  # fmt: skip
        self.tokenizer = Q.load_tokenizer([base_dir, path], SPECIAL_TOKENS, self.name, HINT)
        self.special_ids = self.tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
        if max(self.special_ids) >= qwen.text_config.vocab_size:
            raise RewardModelError(f"hpsv3: <|Reward|> id {self.special_ids} exceeds the checkpoint's vocabulary")
        self.inputs = Q.QwenInputs(self.tokenizer, qwen, self.name)
        self._place()

    def _place(self) -> None:
        super()._place()
        self.net.rm_head.float()  # the reference keeps the head in fp32

    def prompt(self, text: str) -> str:
        items = [{"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=text) + HPSV3_SUFFIX}]
        return Q.render_chat(self.tokenizer, items)

    @classmethod
    def reads_levels(cls, options: dict) -> bool:
        return options.get("resample", "pil") in ("uint8", "pil")

    def aggregate(self, frame_scores: torch.Tensor) -> torch.Tensor:
        return P.topk_mean(frame_scores, self.topk)

    def aggregate_outputs(self, frame_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """score: the mean mu of the best `topk` frames; sigma: the mean sigma of those same frames."""
        mu = frame_scores["score"]
        out = {"score": self.aggregate(mu)}
        if "sigma" in frame_scores:
            out["sigma"] = frame_scores["sigma"].gather(1, P.topk_indices(mu, self.topk)).mean(1)
        return out

    def _frame_scores(self, frames: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        frames = frames.to(self.device).float()
        size = P.smart_resize(*frames.shape[-2:], self.inputs.factor, self.pixels, self.pixels)
        patches = [self.inputs.frames(f[None], size, self.resample) for f in frames]
        ids, mask, pixels, grid, token = self.inputs.batch(
            [self.prompt(p) for p in prompts], patches, "image", self.device
        )
        hidden = self.net.hidden_states(ids, mask, pixels, grid, token)
        out = self.net.head(Q.pool_special(hidden, ids, self.special_ids, self.name)[:, 0])  # [N, output_dim]
        return {"score": out[:, 0], "sigma": out[:, 1]} if out.shape[1] > 1 else {"score": out[:, 0]}
