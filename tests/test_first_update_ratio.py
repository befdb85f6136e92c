"""The first update sees ratio 1 in bf16 (issue 28 item 4): a flow-prediction generator rolled out in bf16
and trained in bf16 under autocast (the CUDA defaults, forced on the CPU) reproduces its rollout's
predictions once they are recomputed under the trainer's numerics; with the buffer's stored ones (the
behaviour before) it does not. The recomputation with other weights equals a replay with those weights
loaded by hand."""

from __future__ import annotations

import pytest
import torch

from bench.bench_first_ratio import bf16_buffer, first_update, flow_config, on_policy, random_base, train_config
from streamalign.buffer.reader import BufferReader
from streamalign.train.loop import Trainer
from streamalign.train.old_policy import recompute_wanted

BF16 = {"dtype": "bf16", "autocast": "bf16"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    config = flow_config(root)
    base = random_base(config, root)
    return config, base, bf16_buffer(config, base, root / "bf16")


@pytest.mark.parametrize("objective", ["copo", "nft", "sde-grpo"])
def test_first_update_ratio_is_one_in_bf16_semi(world, objective):
    config, base, buffer = world
    assert first_update(config, base, buffer, objective, **BF16) <= 1e-3
    if objective != "nft":  # the stored bf16 predictions: the deviation the recomputation removes
        assert first_update(config, base, buffer, objective, **BF16, old_predictions="stored") > 1e-3


@pytest.mark.parametrize("objective", ["copo", "nft", "sde-grpo"])
def test_first_update_ratio_is_one_in_bf16_on_policy(world, tmp_path, monkeypatch, objective):
    monkeypatch.setattr("streamalign.train.loop.plot_rows", lambda *a, **k: None)  # curves.png: half the run time
    config, base, _ = world
    assert on_policy(config, base, tmp_path / "auto", objective, batch_groups=1, **BF16) <= 1e-3


@pytest.mark.slow
def test_on_policy_stored_predictions_miss_ratio_one_in_bf16(world, tmp_path, monkeypatch):
    """What the on-policy loop did before: its rollouts' stored bf16 predictions (bench: 0.19 for SDE-GRPO)."""
    config, base, _ = world
    assert on_policy(config, base, tmp_path, "sde-grpo", batch_groups=1, **BF16, old_predictions="stored") > 1e-3


def test_recomputed_old_predictions_equal_a_replay_with_the_old_weights_loaded(world):
    """The swap path (old weights differ from the current): the old policy's predictions equal predict()
    run with those weights copied in by hand, and the current weights come back unchanged."""
    config, base, buffer = world
    trainer = Trainer(train_config(config, base, "copo", buffer=str(buffer), **BF16).resolve())
    e = next(iter(BufferReader(buffer, shuffle=0))).cast(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # the current policy moved away from the base
    current = [p.detach().clone() for p in trainer.params]
    old = trainer.old.of(e.policy_id)
    assert old is not None and not trainer.old.is_current(old)
    x_t, steps = e.x_t[:2, :3].flatten(0, 1), torch.arange(3).repeat(2)
    text = trainer.text(e.prompt)
    trainer.replay.recompute_old = True
    with trainer.autocast():  # one autocast region per weight state (autocast caches its casts of the weights)
        got = trainer.replay.old_predict(e, text, x_t, steps, e.x0_old[:2, :3].flatten(0, 1))
    assert all(torch.equal(p, c) for p, c in zip(trainer.params, current, strict=True))
    with trainer.autocast(), torch.no_grad():
        now = trainer.replay.predict(e, text, x_t, steps)
    with torch.no_grad():
        for p, v in zip(trainer.params, old, strict=True):
            p.copy_(v)
    with trainer.autocast(), torch.no_grad():
        want = trainer.replay.predict(e, text, x_t, steps)
    assert torch.equal(got, want) and not torch.equal(got, now)
    trainer.replay.recompute_old = False  # stored: the buffer's values
    assert torch.equal(trainer.replay.old_predict(e, text, x_t, steps, e.x0_old[0]), e.x0_old[0])


def test_auto_recomputes_only_below_float32():
    assert not recompute_wanted("auto", False, torch.float32)  # the fp32 path: stored, numbers unchanged
    assert recompute_wanted("auto", True, torch.float32) and recompute_wanted("auto", False, torch.bfloat16)
    assert recompute_wanted("recompute", False, torch.float32) and not recompute_wanted("stored", True, torch.bfloat16)
    with pytest.raises(ValueError, match="--old-predictions"):
        recompute_wanted("sometimes", False, torch.float32)

