"""Causal Wan DiT, KV cache, few-step sampler, NoiseBank and forks, checkpoint loaders, text encoders, codecs."""
