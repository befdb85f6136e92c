"""The Qwen2-VL reward backbone shared by VideoAlign and HPSv3, on transformers 5's module layout.

Both references subclass ``Qwen2VLForConditionalGeneration`` (transformers 4.45) and run the same forward:
token embeddings, the vision tower's merged features scattered into the ``<|video_pad|>`` /
``<|image_pad|>`` positions, then the language model called with ``position_ids=None``, which in 4.45
means plain positions ``0..L-1`` repeated on the 3 M-RoPE axes (not ``get_rope_index``); the reward head
reads the final-norm hidden states at special reward tokens. This module rebuilds that forward on
``Qwen2VLModel`` (``model.visual``, ``model.language_model``) without ``lm_head`` (unused), remaps
checkpoints saved with the old names, and merges nothing: LoRA layers (keys ``*.lora_A.default.weight``)
are injected with peft exactly where the checkpoint has them, so the forward is ``base(x) + B(A(x)) *
alpha / r`` as in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import preprocess as P
from .base import RewardModelError, need_file, require

PEFT_PREFIX = "base_model.model."
DEFAULT_SYSTEM = "You are a helpful assistant."
VIDEO_ITEM = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_ITEM = "<|vision_start|><|image_pad|><|vision_end|>"


def remap_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys -> this module's keys: drop peft's ``base_model.model.`` prefix, take
    ``modules_to_save.default`` copies over ``original_module``, drop ``lm_head``, and rename the
    transformers-4 layout (``visual.*`` -> ``model.visual.*``, ``model.*`` -> ``model.language_model.*``)."""
    out: dict[str, torch.Tensor] = {}
    saved = {k for k in sd if ".modules_to_save.default." in k}
    for key, value in sd.items():
        k = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if ".original_module." in k and key.replace(".original_module.", ".modules_to_save.default.") in saved:
            continue
        k = k.replace(".modules_to_save.default.", ".")
        if k.startswith("lm_head."):
            continue
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model.") and not k.startswith(("model.visual.", "model.language_model.")):
            k = "model.language_model." + k[len("model.") :]
        out[k] = value
    return out


def base_folder(folder: Path, base, named: str | None, who: str, what: str) -> Path:
    """The local folder of the base Qwen2-VL config: `base` when given, else `folder` if it has config.json,
    else the reference config's ``model_name_or_path`` resolved against `folder` (an absolute one is kept)."""
    if base is not None:
        return Path(base)
    if (folder / "config.json").exists():
        return folder
    where = folder / named if named else None
    if where is not None and (where / "config.json").exists():
        return where
    raise RewardModelError(
        f"{who}: no Qwen2-VL config.json in {folder} and model_name_or_path={named!r} is not a folder with one"
        f"{f' (looked in {where})' if where else ''}; put {what}'s config.json there or pass base=<its local "
        "folder> (only its config.json is read)"
    )


def load_config(folder: Path, who: str, hint: str):
    """``Qwen2VLConfig`` from a local folder's config.json (sdpa attention)."""
    transformers = require("transformers", who)
    need_file(folder / "config.json", who, "Qwen2-VL config.json", hint)
    config = transformers.Qwen2VLConfig.from_pretrained(str(folder), local_files_only=True)
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    return config


def load_tokenizer(folders: list[Path], special: list[str], who: str, hint: str):
    """The first local folder holding a tokenizer, right padding, with the reward's special tokens added
    (as the references do with ``add_special_tokens``; a no-op where the folder already has them)."""
    transformers = require("transformers", who)
    for folder in folders:
        if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            break
    else:
        raise RewardModelError(
            f"{who}: no tokenizer (tokenizer.json / tokenizer_config.json) in {[str(f) for f in folders]}; {hint}"
        )
    missing = [t for t in special if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tok.padding_side = "right"
    if tok.pad_token is None:
        raise RewardModelError(f"{who}: the tokenizer in {folder} has no pad token; {hint}")
    return tok


def render_chat(tokenizer, items: list[dict]) -> str:
    """One user turn with `items` (``{"type": "video"|"image"}`` / ``{"type": "text", "text": ...}``) and the
    generation prompt, through the tokenizer's chat template; without one, Qwen2-VL's default template
    (system turn "You are a helpful assistant.") written out."""
    messages = [{"role": "user", "content": items}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    body = "".join(
        VIDEO_ITEM if it["type"] == "video" else IMAGE_ITEM if it["type"] == "image" else it["text"] for it in items
    )
    return (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"
    )


def patchify(frames: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2):
    """Qwen2-VL's flat patches of normalised frames ``[T, C, H, W]``: ``([gt*gh*gw, C*temporal*patch*patch],
    (gt, gh, gw))``, patch order (t, h/merge, w/merge, merge_h, merge_w); an odd last group (and a single
    image) repeats the last frame, as the processor does."""
    t, c, h, w = frames.shape
    if t % temporal:
        frames = torch.cat([frames, frames[-1:].expand(temporal - t % temporal, -1, -1, -1)])
    gt, gh, gw = frames.shape[0] // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch), (gt, gh, gw)


class QwenRewardNet(nn.Module):
    """``Qwen2VLModel`` + a reward head, forward as in the references (see the module doc)."""

    def __init__(self, model: nn.Module, head: nn.Module, head_fp32: bool = False) -> None:
        super().__init__()
        self.model = model
        self.rm_head = head
        self.head_fp32 = head_fp32

    @property
    def config(self):
        return self.model.config

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, grid_thw=None, token_id=None):
        lm = self.model.language_model
        embeds = lm.embed_tokens(input_ids)
        if pixel_values is not None:
            visual = self.model.visual
            feats = visual(pixel_values.to(visual.get_dtype()), grid_thw=grid_thw).pooler_output
            mask = (input_ids == token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device).view(1, 1, n).expand(3, b, n)
        return lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions).last_hidden_state

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_fp32:  # HPSv3: fp32 head under autocast(float32) on the bf16 hidden states
            return self.rm_head(hidden.float())
        return self.rm_head(hidden)


def build(
    config,
    sd: dict[str, torch.Tensor],
    head: nn.Module,
    who: str,
    source: Path,
    head_fp32: bool = False,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
):
    """QwenRewardNet from a remapped state dict: built on the meta device, LoRA injected where the checkpoint
    has ``lora_A``, weights assigned strictly (a missing or unexpected key is one clear error)."""
    transformers = require("transformers", who)
    emb = sd.get("model.language_model.embed_tokens.weight")
    if emb is None:
        raise RewardModelError(f"{who}: {source} has no language-model embedding (not a Qwen2-VL reward checkpoint)")
    config.text_config.vocab_size = emb.shape[0]  # the references resize embeddings to len(tokenizer)
    with torch.device("meta"):
        net = QwenRewardNet(transformers.Qwen2VLModel(config), head, head_fp32)
    lora = sorted({k[: -len(".lora_A.default.weight")] for k in sd if k.endswith(".lora_A.default.weight")})
    if lora:
        peft = require("peft", who)
        r = sd[lora[0] + ".lora_A.default.weight"].shape[0]
        if not all(k.startswith("model.") for k in lora):
            raise RewardModelError(f"{who}: {source} has LoRA outside the Qwen2-VL model: {lora[:3]}")
        targets = [k[len("model.") :] for k in lora]
        cfg = peft.LoraConfig(
            r=r,
            lora_alpha=lora_alpha or r,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
            use_rslora=use_rslora,
        )
        peft.inject_adapter_in_model(cfg, net.model)
    sd = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}
    try:
        result = net.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches: the first one, on one line
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise RewardModelError(f"{who}: {source} does not match the Qwen2-VL config: {first}") from None
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys:
        raise RewardModelError(
            f"{who}: {source} does not match the Qwen2-VL config: missing {missing[:4]}, unexpected "
            f"{result.unexpected_keys[:4]} (is the base config the one the reward was trained on?)"
        )
    _materialise_buffers(net)
    return net


def _materialise_buffers(net: nn.Module) -> None:
    """Rebuild modules whose (non-persistent) buffers were left on the meta device: the rotary embeddings,
    whose constructors take only their config."""
    for name, module in list(net.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, type(module)(module.config))
    meta = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if meta:
        raise RewardModelError(f"reward model: tensors left unloaded: {meta[:4]}")


def pool_special(hidden: torch.Tensor, input_ids: torch.Tensor, ids: list[int], who: str) -> torch.Tensor:
    """Hidden states at the special reward tokens, in sequence order: ``[B, len(ids), D]``."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in ids:
        mask |= input_ids == i
    counts = mask.sum(1)
    if not bool((counts == len(ids)).all()):
        raise RewardModelError(f"{who}: expected {len(ids)} reward token(s) per sample, found {counts.tolist()}")
    return hidden[mask].view(input_ids.shape[0], len(ids), -1)


class QwenInputs:
    """Tokenised chats with their vision patches, the processor's job: ``<|video_pad|>``/``<|image_pad|>``
    expanded to ``gt*gh*gw / merge**2`` copies, right padding, patches concatenated in batch order."""

    def __init__(self, tokenizer, config, who: str) -> None:
        self.tokenizer = tokenizer
        vc = config.vision_config
        self.patch, self.merge, self.temporal = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        self.factor = self.patch * self.merge
        self.who = who
        for token, attr in (("<|video_pad|>", "video_token_id"), ("<|image_pad|>", "image_token_id")):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid != getattr(config, attr):
                raise RewardModelError(
                    f"{who}: tokenizer id of {token} is {tid}, the config's {attr} is {getattr(config, attr)}"
                )
        self.video_id, self.image_id = config.video_token_id, config.image_token_id

    def frames(self, frames: torch.Tensor, size: tuple[int, int], mode: str):
        """Resized, normalised, patchified frames ``[T, 3, H, W]`` in [0, 1]."""
        x = P.normalize(P.resize(frames, size, mode))
        return patchify(x, self.patch, self.merge, self.temporal)

    def batch(self, texts: list[str], patches: list[tuple[torch.Tensor, tuple[int, int, int]]], kind: str, device):
        token = "<|video_pad|>" if kind == "video" else "<|image_pad|>"
        expanded = []
        for text, (_, grid) in zip(texts, patches, strict=True):
            if text.count(token) != 1:
                raise RewardModelError(
                    f"{self.who}: the rendered chat must hold one {token}, found {text.count(token)}"
                )
            n = grid[0] * grid[1] * grid[2] // self.merge**2
            expanded.append(text.replace(token, token * n))
        enc = self.tokenizer(expanded, padding=True, return_tensors="pt")
        pixels = torch.cat([p for p, _ in patches]).to(device)
        grid = torch.tensor([g for _, g in patches], dtype=torch.long, device=device)
        token_id = self.video_id if kind == "video" else self.image_id
        return enc["input_ids"].to(device), enc["attention_mask"].to(device), pixels, grid, token_id
