"""Controlled noise for rollouts: every random tensor is addressable and reproducible.

A rollout needs, per chunk c, an initial noise (step 0) and one solver noise per later denoising step
(step i >= 1 re-noises the x0 prediction of step i-1 to the level of step i). A :class:`NoiseBank`
derives each of them from one integer seed and the address ``(chunk, step, branch)``: the same address
always gives the same bytes, independent of draw order or device (drawn on CPU in float32).
:class:`ExplicitNoise` serves given tensors (conformance tests, replay), :class:`ForkNoise` the noise of
a fork group: shared everywhere except the pivot chunk's initial noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *address: int) -> int:
    """A 63-bit seed for `address` under `seed` (stable across Python/torch versions)."""
    h = _splitmix64(seed & _MASK64)
    for a in address:
        h = _splitmix64(h ^ (a & _MASK64))
    return h & ((1 << 63) - 1)


class NoiseSource(Protocol):
    """What the sampler asks for; tensors are ``[B, chunk_frames, C, H, W]``."""

    def initial(self, chunk: int) -> torch.Tensor: ...

    def solver(self, chunk: int, step: int) -> torch.Tensor: ...


class NoiseBank:
    """Noise derived from one seed per batch row. `chunk_shape` = (chunk_frames, C, H, W)."""

    def __init__(self, seeds: int | Sequence[int], chunk_shape: Sequence[int]) -> None:
        self.seeds = [seeds] if isinstance(seeds, int) else list(seeds)
        self.chunk_shape = tuple(chunk_shape)

    def draw(self, chunk: int, step: int, branch: int | None = None) -> torch.Tensor:
        """[B, *chunk_shape] standard normal noise at address (chunk, step, branch)."""
        b = 0 if branch is None else branch + 1
        out = []
        for seed in self.seeds:
            g = torch.Generator().manual_seed(derive_seed(seed, chunk, step, b))
            out.append(torch.randn(self.chunk_shape, generator=g, dtype=torch.float32))
        return torch.stack(out)

    def initial(self, chunk: int) -> torch.Tensor:
        return self.draw(chunk, 0)

    def solver(self, chunk: int, step: int) -> torch.Tensor:
        if step < 1:
            raise ValueError("solver noise steps start at 1 (step 0 is the initial noise)")
        return self.draw(chunk, step)

    def shared(self, num_chunks: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A one-seed bank's initial noise of every chunk [L, c, C, H, W] and solver noise of every chunk and
        step 1..T-1 [L, T-1, c, C, H, W] (what a fork group stores as shared by its branches)."""
        init = torch.cat([self.initial(j) for j in range(num_chunks)])
        if steps < 2:
            return init, torch.zeros(num_chunks, 0, *self.chunk_shape)
        return init, torch.stack([torch.cat([self.solver(j, i) for i in range(1, steps)]) for j in range(num_chunks)])

    def delta(self, chunk: int, branch: int) -> torch.Tensor:
        """Per-branch perturbation delta_i of a fork at `chunk` ([B, *chunk_shape])."""
        return self.draw(chunk, 0, branch)


class ExplicitNoise:
    """Noise given as tensors: `initial` [B, F, C, H, W] and `solver` [num_chunks, T-1, B, c, C, H, W]."""

    def __init__(self, initial: torch.Tensor, solver: torch.Tensor, chunk_frames: int) -> None:
        self.initial_all, self.solver_all, self.chunk_frames = initial, solver, chunk_frames

    def initial(self, chunk: int) -> torch.Tensor:
        c = self.chunk_frames
        return self.initial_all[:, chunk * c : (chunk + 1) * c]

    def solver(self, chunk: int, step: int) -> torch.Tensor:
        return self.solver_all[chunk, step - 1]


class ForkNoise:
    """Noise of a fork group of G branches from a batch-1 source.

    Initial forks (``deltas`` [G, c, C, H, W]): at the pivot chunk branch i starts from
    ``sqrt(1 - s^2) eps* + s delta_i`` (eps* = the source's initial noise). Solver forks (``solver_deltas``:
    step -> [G, c, C, H, W]): the pivot's solver noise at those steps is ``sqrt(1 - s^2) eps + s delta_i``
    instead (the Flow-GRPO setting: same initial noise, different re-noising). Every other noise is shared.
    """

    def __init__(
        self,
        source: NoiseSource,
        pivot: int,
        deltas: torch.Tensor | None,
        strength: float,
        solver_deltas: dict[int, torch.Tensor] | None = None,
    ) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"fork strength sigma must be in [0, 1], got {strength}")
        if (deltas is None) == (not solver_deltas):
            raise ValueError("a fork perturbs either the initial noise (deltas) or solver noise (solver_deltas)")
        self.source, self.pivot, self.deltas, self.strength = source, pivot, deltas, strength
        self.solver_deltas = solver_deltas or {}
        self.group = (deltas if deltas is not None else next(iter(self.solver_deltas.values()))).shape[0]

    def branches(self, start: int, stop: int) -> ForkNoise:
        """The same fork restricted to branches ``start .. stop-1`` (a batch of a branch-batched group)."""
        if not 0 <= start < stop <= self.group:
            raise ValueError(f"branches {start}..{stop - 1} are outside the group of {self.group}")
        deltas = None if self.deltas is None else self.deltas[start:stop]
        solver = {k: d[start:stop] for k, d in self.solver_deltas.items()}
        return ForkNoise(self.source, self.pivot, deltas, self.strength, solver_deltas=solver or None)

    def _mix(self, eps: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s = self.strength
        return math.sqrt(1.0 - s * s) * eps + s * delta

    def initial(self, chunk: int) -> torch.Tensor:
        eps = self.source.initial(chunk)
        if chunk != self.pivot or self.deltas is None:
            return eps.expand(self.group, *eps.shape[1:])
        return self._mix(eps, self.deltas)

    def solver(self, chunk: int, step: int) -> torch.Tensor:
        eps = self.source.solver(chunk, step)
        if chunk == self.pivot and step in self.solver_deltas:
            return self._mix(eps, self.solver_deltas[step])
        return eps.expand(self.group, *eps.shape[1:])
