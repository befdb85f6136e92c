"""``--compile``: the compiled transformer blocks give eager's outputs (inductor on the CPU, within 1e-5) and
compile one graph per region and batch shape, however many chunks a rollout has."""

from __future__ import annotations

import copy

import pytest
import torch

from streamalign.models.compiled import REGIONS, compile_blocks, is_compiled, reset_compiled, uncompile_blocks
from streamalign.models.sampler import Sampler

from .conftest import make_model, tiny_config

TOL = 1e-5


def _pair(cfg, seed: int = 0) -> tuple[Sampler, Sampler]:
    """(eager sampler, sampler of a compiled copy of the same weights), no graph compiled yet."""
    reset_compiled()
    eager = make_model(cfg, seed)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    return Sampler(eager, cfg), Sampler(compiled, cfg)


def _text(cfg) -> torch.Tensor:
    return torch.randn(1, 7, cfg.arch.text_dim, generator=torch.Generator().manual_seed(1))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def test_compiled_rollout_and_fork_group_equal_eager_with_graphs_bounded():
    """A 2-chunk and a 4-chunk rollout and a fork group (batch-1 prefix, branch batches of 1) on the compiled
    blocks: latents within 1e-5 of eager, one graph per region (qkv, kv, rest) for all of it: neither twice
    the chunks and cache length nor the group's prefix and branch caches add one."""
    cfg = tiny_config(frames=12)
    eager, comp = _pair(cfg)
    text = _text(cfg)
    stats = comp.model.compile_stats
    with torch.no_grad():
        a = eager.rollout(text, eager.noise_bank([1]), num_chunks=2)
        b = comp.rollout(text, comp.noise_bank([1]), num_chunks=2)
        assert _maxdiff(a, b) <= TOL
        assert stats.graphs == dict.fromkeys(REGIONS, 1)  # one batch shape, shared by both blocks
        assert stats.seconds > 0
        a = eager.rollout(text, eager.noise_bank([3]))
        b = comp.rollout(text, comp.noise_bank([3]))
        assert _maxdiff(a, b) <= TOL and a.abs().max() > 0.1  # outputs that are not all alike
        ga = eager.fork_group(text, eager.noise_bank(5), 1, 2, branch_batch=1)
        gb = comp.fork_group(text, comp.noise_bank(5), 1, 2, branch_batch=1)
    for name in ("context", "x_t", "x0_old", "branch_latents"):
        assert _maxdiff(getattr(ga, name), getattr(gb, name)) <= TOL, name
    assert not torch.equal(gb.branch_latents[0], gb.branch_latents[1])  # the branches differ
    assert stats.graphs == dict.fromkeys(REGIONS, 1)
    assert is_compiled(comp.model) and not is_compiled(eager.model)
    # another model of the same shapes reuses the graphs, with its own weights
    other = make_model(cfg, seed=1)
    c = Sampler(other, cfg).rollout(text, eager.noise_bank([3]))
    compile_blocks(other)
    d = Sampler(other, cfg).rollout(text, eager.noise_bank([3]))
    assert _maxdiff(c, d) <= TOL and _maxdiff(d, a) > 1e-2 and stats.graphs == dict.fromkeys(REGIONS, 1)


def test_compile_is_off_for_fake_tensors_and_undone_by_uncompile(tiny, text):
    """Plans and memory checks (fake tensors) run the blocks eagerly: nothing is compiled for them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = tiny[1]
    stats = compile_blocks(model)
    before = stats.total
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        x = mode.from_tensor(torch.zeros(1, 3, 16, 8, 8))
        model(x, torch.zeros(1, 3), text)
    assert stats.total == before
    uncompile_blocks(model)
    assert not is_compiled(model) and not hasattr(model, "compile_stats")
    with pytest.raises(ValueError, match="no compilable transformer blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_rolling_cache_and_training_replay_equal_eager():
    """A rolling cache (sink 1 + window 5, 8 chunks: the ring wraps), a fork group with branch batches of 2
    (one new batch shape: 3 more graphs) and the training replay's loss and gradients (rows of the pivot
    chunk over a batch-1 prefix, with and without activation checkpointing)."""
    cfg = tiny_config(frames=24, sink=1, window=5)
    eager, comp = _pair(cfg)
    text = _text(cfg)
    stats = comp.model.compile_stats
    with torch.no_grad():
        a = eager.rollout(text, eager.noise_bank([1]))
        b = comp.rollout(text, comp.noise_bank([1]))
        assert _maxdiff(a, b) <= TOL
        assert stats.graphs == dict.fromkeys(REGIONS, 1)
        ga = eager.fork_group(text, eager.noise_bank(5), 3, 3, branch_batch=2)
        gb = comp.fork_group(text, comp.noise_bank(5), 3, 3, branch_batch=2)
    for name in ("context", "x_t", "x0_old", "branch_latents"):
        assert _maxdiff(getattr(ga, name), getattr(gb, name)) <= TOL, name
    assert stats.graphs == dict.fromkeys(REGIONS, 2)
    pivot = 2
    rows = torch.randn(4, *eager.chunk_shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1000.0, 937.5, 833.3, 625.0])
    sigma = (t / 1000).double()
    for checkpointing in (False, True):
        losses, grads = [], []
        for s in (eager, comp):
            s.model.gradient_checkpointing = checkpointing
            s.model.zero_grad()
            prefix = s.new_cache(1, pivot + 1)
            with torch.no_grad():
                for j in range(pivot):
                    s.denoise_chunk(prefix, j, s.noise_bank([7]), text)
            x0 = s.predict_rows(rows, t, sigma, text, prefix, pivot * s.chunk_frames)
            loss = (x0 - rows).square().mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in s.model.named_parameters() if p.grad is not None})
        assert abs(losses[0].item() - losses[1].item()) <= TOL * max(1.0, abs(losses[0].item()))
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
        for n, g in grads[0].items():  # relative to the gradient's size (eager's is the reference)
            assert _maxdiff(g, grads[1][n]) <= TOL * max(1.0, g.abs().max().item()), n


def test_the_compile_flag_reaches_the_generator_of_every_stage():
    """``--compile`` (the Hardware section every stage has) compiles the loaded generator's blocks; off by
    default; refused with --shard-base."""
    from streamalign.models.placement import Placement
    from streamalign.pipeline import Pipeline
    from streamalign.schemas.sections import Hardware
    from streamalign.train.config import TrainConfig

    assert not Hardware().compile and not Placement.of(Hardware()).compile
    reset_compiled()
    policy = Pipeline.load("shapes", placement=Placement.of(Hardware(compile=True)))
    assert is_compiled(policy.model) and policy.placement.compile
    assert policy.model.compile_stats.total == 0  # nothing compiled before the first forward
    assert not Pipeline.load("shapes").placement.compile
    with pytest.raises(ValueError, match="--compile is not supported with --shard-base"):
        TrainConfig(mode="semi", buffer="b", hardware={"compile": True, "shard_base": True})


@pytest.mark.slow
def test_compiled_lora_replay_equal_eager():
    """As ``train`` runs it: blocks compiled at load, the LoRA attached after (peft's layers are traced at the
    first forward); one replay's loss and LoRA gradients within 1e-5 of eager's."""
    from streamalign.adapters.lora import LoraSettings, attach_lora, lora_parameters

    cfg = tiny_config(frames=12)
    eager, comp = _pair(cfg)
    text = _text(cfg)
    losses, grads = [], []
    for s in (eager, comp):
        peft = attach_lora(s.model, LoraSettings(rank=4, alpha=8.0), seed=3)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():  # B = 0 at attach would leave A without gradient
            for n, p in lora_parameters(peft):
                if ".lora_B." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        prefix = s.new_cache(1, 2)
        with torch.no_grad():
            s.denoise_chunk(prefix, 0, s.noise_bank([7]), text)
        rows = torch.randn(3, *s.chunk_shape, generator=torch.Generator().manual_seed(5))
        t = torch.tensor([1000.0, 833.3, 625.0])
        x0 = s.predict_rows(rows, t, (t / 1000).double(), text, prefix, s.chunk_frames)
        loss = x0.square().mean()
        loss.backward()
        losses.append(loss.item())
        grads.append([(n, p.grad.clone()) for n, p in lora_parameters(peft)])
    assert abs(losses[0] - losses[1]) <= TOL * max(1.0, abs(losses[0]))
    assert len(grads[0]) == len(grads[1]) > 10
    for (n, ge), (_, gc) in zip(*grads, strict=True):
        assert ge.abs().max() > 0, n
        assert _maxdiff(ge, gc) <= TOL * max(1.0, ge.abs().max().item()), n
