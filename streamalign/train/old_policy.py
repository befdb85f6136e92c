"""The old (rollout) policy's predictions of replayed rows, recomputed under the trainer's own numerics.

The ratio objectives compare the current policy's x0 predictions with the old policy's. A buffer stores the
old predictions (``x0_old``) as the rollout computed them: in the store dtype, at step inputs ``x_t``
rounded to it, with the rollout's batching and precision. In bf16 the replay of an unchanged policy then
does not give back the stored values, and the first update's ratio is not 1 (docs/numerics.md measures
it). PPO trainers recompute the old policy's log-probabilities with the trainer itself for that reason;
here the old policy's predictions of exactly the rows an update replays are recomputed with its LoRA
weights, in the same micro-batches and under the same autocast as the current policy's, so an unchanged
policy reproduces them bit for bit.

The old policy of an entry is known by its ``policy_id``: the run's starting point (the base, or the base
and ``--init-adapter``: semi-on-policy buffers) or an on-policy iteration's rollout policy. An entry
rolled out by any other policy keeps its stored predictions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor

OLD_PREDICTIONS = ("auto", "recompute", "stored")


class OldPolicy:
    """LoRA weights of the policies whose entries a run trains on, by policy id. ``params``: the trainable
    LoRA parameters (their values are swapped in place for an old forward, then restored)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.weights: dict[str, list[torch.Tensor]] = {}

    def remember(self, policy_id: str, values: list[torch.Tensor] | None = None) -> None:
        """Policy `policy_id` is the LoRA with `values` (default: the current values)."""
        self.weights[policy_id] = values if values is not None else [p.detach().clone() for p in self.params]

    def of(self, policy_id: str) -> list[torch.Tensor] | None:
        return self.weights.get(policy_id)

    def is_current(self, values: list[torch.Tensor]) -> bool:
        """Whether `values` equal the current LoRA values exactly (the old forward would repeat the current).
        Simulated weights (the memory planner's fake tensors) have no values: False, so the plan holds the
        old forward every update after the first runs."""
        if any(isinstance(t, FakeTensor) for t in (*values, *self.params)):
            return False
        return all(torch.equal(v, p.detach()) for v, p in zip(values, self.params, strict=True))


@contextlib.contextmanager
def loaded_weights(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> Iterator[None]:
    """`values` loaded into `params` in place for the block (no grad inside), then the previous values back.

    Autocast caches its low-precision copy of every leaf parameter that requires grad until the outermost
    autocast region ends, so a forward after an in-place change would still read the old copy (every
    forward of an update's region the first one's weights): the cache is cleared at each change."""
    keep = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
    torch.clear_autocast_cache()
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, keep, strict=True):
                p.copy_(v)
        torch.clear_autocast_cache()


def recompute_wanted(mode: str, reduced_compute: bool, stored_dtype: torch.dtype) -> bool:
    """Whether an entry's old predictions are recomputed: ``recompute`` always, ``stored`` never, ``auto``
    when the trainer computes below float32 (bf16 autocast or 16-bit base weights) or the entry's latents
    are stored below it: a float32 rollout replayed in float32 reproduces its stored predictions already
    (first-update ratio deviation 0 measured), so that path and its numbers stay as they were."""
    if mode not in OLD_PREDICTIONS:
        raise ValueError(f"--old-predictions must be one of {', '.join(OLD_PREDICTIONS)}, got {mode!r}")
    return mode == "recompute" or (mode == "auto" and (reduced_compute or stored_dtype != torch.float32))
