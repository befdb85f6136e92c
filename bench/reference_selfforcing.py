"""The reference Self-Forcing inference pipeline (``CausalInferencePipeline``) on the CPU, for side-by-side timing.

Loads a Self-Forcing checkout the person running the bench names (``--reference DIR``; nothing of it is
shipped here) and runs its own ``CausalInferencePipeline.inference`` on our weights, text context and
noises, so its latents can be compared with ours. What is set around it, and why:

- its package ``__init__``s import training, demo and CUDA-only code: the packages are entered without
  them; ``demo_utils.memory`` and ``wan.modules.t5`` (both ask CUDA for a device at import) are replaced
  by CPU names (the text encoder is not used);
- its attention casts to bf16 and needs flash-attn for text attention: both go through its own SDPA
  fallback in the inputs' dtype (float32, as ours);
- it hard-codes wan-1.3b's 30 blocks, 1560 tokens per frame and a 12x128-head cache: the pipeline's
  block count and tokens per frame are set to the config's, and its KV cache is allocated at the config's
  shape (as its ``_initialize_kv_cache`` would at full size) before the first call; later calls reuse it,
  as the reference does;
- its solver noise comes from ``torch.randn_like``: during a call that draw returns our NoiseBank's solver
  noise of the same (chunk, step), so both pipelines see the same noises;
- the text encoder and VAE are replaced by the given context (``prompt_embeds``) and the identity (latents
  are compared, not pixels).

Needs ``einops`` and ``diffusers`` importable (``--reference-deps DIR`` adds a folder to ``sys.path``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import types
from pathlib import Path

import torch

from streamalign.models.noise import NoiseBank
from streamalign.models.sampler import Sampler


def _package(name: str, path: Path) -> None:
    """Enter package `name` at `path` without running its ``__init__``."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    sys.modules[name] = mod


def _import_reference(root: Path):
    if not (root / "pipeline" / "causal_inference.py").is_file():
        raise SystemExit(f"error: --reference {root}: no pipeline/causal_inference.py (give a Self-Forcing checkout)")
    sys.path.insert(0, str(root))
    for name in ("wan", "wan/modules", "pipeline", "utils", "demo_utils"):
        _package(name.replace("/", "."), root / name)
    memory = types.ModuleType("demo_utils.memory")
    memory.gpu = torch.device("cpu")
    memory.get_cuda_free_memory_gb = lambda *a, **k: 0.0
    memory.DynamicSwapInstaller = None
    memory.move_model_to_device_with_memory_preservation = lambda *a, **k: None
    sys.modules["demo_utils.memory"] = memory
    t5 = types.ModuleType("wan.modules.t5")  # asks CUDA for a device at import; the text encoder is not used
    t5.umt5_xxl = None
    sys.modules["wan.modules.t5"] = t5
    attention_mod = importlib.import_module("wan.modules.attention")
    model_mod = importlib.import_module("wan.modules.model")
    causal_mod = importlib.import_module("wan.modules.causal_model")
    fallback = attention_mod.attention

    def same_dtype_attention(q, k, v, *args, k_lens=None, **kwargs):
        kwargs["dtype"] = q.dtype
        return fallback(q, k, v, *args, **kwargs)

    model_mod.flash_attention = same_dtype_attention
    causal_mod.attention = same_dtype_attention
    wrapper_mod = importlib.import_module("utils.wan_wrapper")
    scheduler_mod = importlib.import_module("utils.scheduler")
    pipeline_mod = importlib.import_module("pipeline.causal_inference")
    return causal_mod, wrapper_mod, scheduler_mod, pipeline_mod


class _Text(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.context: torch.Tensor | None = None

    def forward(self, text_prompts):
        return {"prompt_embeds": self.context.expand(len(text_prompts), *self.context.shape[1:])}


class _Identity(torch.nn.Module):
    def decode_to_pixel(self, latents, use_cache=False):
        return latents


class ReferencePipeline:
    """The reference pipeline with `sampler`'s weights; ``rollout(context, bank)`` -> latents [B, F, C, H, W]."""

    def __init__(self, root: str | Path, sampler: Sampler) -> None:
        causal_mod, wrapper_mod, scheduler_mod, pipeline_mod = _import_reference(Path(root))
        cfg, arch = sampler.config, sampler.model.arch
        cc = cfg.cache
        local = -1 if cc.window is None else cc.sink + cc.window
        model = causal_mod.CausalWanModel(
            model_type="t2v", patch_size=tuple(arch.patch_size), text_len=arch.text_len, in_dim=arch.in_dim,
            dim=arch.dim, ffn_dim=arch.ffn_dim, freq_dim=arch.freq_dim, text_dim=arch.text_dim,
            out_dim=arch.out_dim, num_heads=arch.num_heads, num_layers=arch.num_layers, local_attn_size=local,
            sink_size=cc.sink, qk_norm=arch.qk_norm, cross_attn_norm=arch.cross_attn_norm, eps=arch.eps,
        )  # fmt: skip
        model.load_state_dict(sampler.model.state_dict(), strict=True)
        model.eval()
        tpf = cfg.tokens_per_frame
        frames = cfg.latent.frames if cc.window is None else local
        for block in model.blocks:  # its window in tokens assumes 1560 tokens per frame
            block.self_attn.max_attention_size = frames * tpf
        wrapper = wrapper_mod.WanDiffusionWrapper.__new__(wrapper_mod.WanDiffusionWrapper)
        torch.nn.Module.__init__(wrapper)
        wrapper.model, wrapper.uniform_timestep, wrapper.seq_len = model, False, 10**9
        flow = scheduler_mod.FlowMatchScheduler(shift=cfg.sampler.shift, sigma_min=0.0, extra_one_step=True)
        wrapper.scheduler = flow
        wrapper.scheduler.set_timesteps(cfg.sampler.num_train_timesteps, training=True)
        wrapper.post_init()
        args = types.SimpleNamespace(
            denoising_step_list=list(cfg.sampler.denoising_steps), warp_denoising_step=cfg.sampler.warp,
            num_frame_per_block=cfg.sampler.chunk_frames, independent_first_frame=False,
            context_noise=cfg.sampler.context_t,
        )  # fmt: skip
        self.text = _Text()
        with contextlib.redirect_stdout(io.StringIO()):
            self.pipe = pipeline_mod.CausalInferencePipeline(args, "cpu", wrapper, self.text, _Identity())
        self.pipe.num_transformer_blocks, self.pipe.frame_seq_length = arch.num_layers, tpf
        self.sampler, self.cache_tokens, self._batch = sampler, frames * tpf, None

    def _allocate(self, batch: int) -> None:
        arch = self.sampler.model.arch
        shape = (batch, self.cache_tokens, arch.num_heads, arch.head_dim)
        zeros = {"global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])}
        self.pipe.kv_cache1 = [
            {"k": torch.zeros(shape), "v": torch.zeros(shape), **{k: v.clone() for k, v in zeros.items()}}
            for _ in range(arch.num_layers)
        ]
        self.pipe.crossattn_cache = [{"k": None, "v": None, "is_init": False} for _ in range(arch.num_layers)]
        self._batch = batch

    @torch.no_grad()
    def rollout(self, context: torch.Tensor, bank: NoiseBank) -> torch.Tensor:
        n = self.sampler.config.num_chunks
        noise = torch.cat([bank.initial(j) for j in range(n)], dim=1)
        if self._batch != noise.shape[0]:
            self._allocate(noise.shape[0])
        steps = len(self.sampler.schedule)
        order = iter([(j, i) for j in range(n) for i in range(1, steps)])
        real = torch.randn_like

        def bank_noise(like, *args, **kwargs):
            j, i = next(order)
            return bank.solver(j, i).flatten(0, 1).to(like)

        self.text.context = context
        torch.randn_like = bank_noise
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                _video, latents = self.pipe.inference(noise, ["p"] * noise.shape[0], return_latents=True)
        finally:
            torch.randn_like = real
        return latents
