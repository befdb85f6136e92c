"""Streaming long tuning: long rollouts with a rolling KV cache, training on the pivot of a local clip with
the history detached; memory bounded by the window, not the video length."""

from __future__ import annotations

import torch

from streamalign.adapters.lora import LoraSettings, attach_lora
from streamalign.models.sampler import Sampler
from streamalign.train.memory import SavedBytes
from streamalign.train.replay import PivotReplay
from tests.conftest import make_model, tiny_config


def _lora_sampler(cfg):
    peft = attach_lora(make_model(cfg), LoraSettings(4, 8.0), seed=0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return Sampler(peft.base_model.model, cfg)


class Entry:  # the fields PivotReplay reads
    def __init__(self, pivot, context):
        self.pivot, self.context, self.entry_id, self.kv = pivot, context, "e", {}


def test_rolling_replay_matches_the_rollout_and_history_gets_no_gradient():
    cfg = tiny_config(frames=24, window=6)  # 8 chunks of 3 frames, a rolling window of 2 chunks
    s = _lora_sampler(cfg)
    text = torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim)
    grp = s.fork_group(text, s.noise_bank(3), pivot=6, group_size=3)
    context = grp.context.clone().requires_grad_(True)  # the history, as a leaf: any path would reach it
    e = Entry(6, context)
    replay = PivotReplay(s)
    cache = replay.prefix(e, text)
    assert all(not t.requires_grad for t in [*cache.k, *cache.v])  # the history's KV is detached
    x_t = grp.x_t.flatten(0, 1)
    steps = torch.arange(grp.x_t.shape[1]).repeat(3)
    pred = replay.predict(e, text, x_t, steps, cache)
    assert (pred - grp.x0_old.flatten(0, 1)).abs().max() < 1e-5  # the rebuilt rolling cache is the rollout's
    pred.pow(2).mean().backward()
    assert context.grad is None  # no gradient flows into earlier chunks
    lora_grads = [p.grad for n, p in s.model.named_parameters() if "lora_" in n]
    assert all(g is not None for g in lora_grads) and sum(g.abs().sum() for g in lora_grads) > 0


def test_memory_is_bounded_by_the_window_not_the_video_length():
    def saved(cfg, pivot):
        s = _lora_sampler(cfg)
        text = torch.randn(1, cfg.arch.text_len, cfg.arch.text_dim)
        e = Entry(pivot, torch.randn(pivot * 3, *s.chunk_shape[1:]))
        x_t = torch.randn(4, *s.chunk_shape)
        with SavedBytes(s.model) as m:
            PivotReplay(s).predict(e, text, x_t, torch.arange(4)).pow(2).mean()
        return m.total

    rolling = [saved(tiny_config(frames=3 * n, window=6), n - 1) for n in (4, 8, 16)]
    full = [saved(tiny_config(frames=3 * n), n - 1) for n in (4, 8, 16)]
    assert rolling[0] == rolling[1] == rolling[2]  # a pivot deep in a long video costs what one at chunk 3 does
    assert full[0] < full[1] < full[2]  # a global cache grows with the history
