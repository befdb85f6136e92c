"""KV-routed fork groups (KVPO's exploration, ``collect --fork kv-routing``) on the one sampler.

Row 0 of the group is the anchor (the usual rollout), rows 1..K are branches that attend to the frames
their :class:`~streamalign.models.kv_routing.RoutingPlan` names in the perturbed chunks; all rows share
every noise (the group's :class:`~streamalign.models.noise.NoiseBank` seed), so they differ only in
attention. The prefix (chunks before the first perturbed one) is rolled out once (batch 1) into a rolling
cache with ``history`` extra ring slots; each row then reads it without copies
(:meth:`~streamalign.models.kv_cache.KVCache.expand`), one row at a time (rows attend to different frames,
so they cannot share a batch), each row's KV freed before the next. A branch team splits the rows
over its ranks (``rows``), each rank computing the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schemas.config import ModelConfig
from .kv_routing import RoutingGeometry, RoutingPlan, plan_routing
from .noise import NoiseBank
from .sampler import ForkGroup, Sampler


@dataclass
class RoutedGroup(ForkGroup):
    """A fork group whose rows differ in KV routing: `routing` (RoutingPlan.to_json) and x0_unrouted
    [G, T, c, C, H, W], the policy's pivot-step predictions of every row under the unrouted context."""

    routing: dict | None = None
    x0_unrouted: torch.Tensor | None = None

    BRANCH_FIELDS = (*ForkGroup.BRANCH_FIELDS, "x0_unrouted")  # what a branch team gathers row by row


def routing_geometry(config: ModelConfig, history: int, m_nearest: int, blocks: int, first_chunks: int,
                     start: int | None = None) -> RoutingGeometry:  # fmt: skip
    """The routing geometry of a model config (its rolling cache's sink and window), checked: some chunk (or
    the given `start`) can begin the perturbation; raises ValueError naming the flag to change otherwise."""
    cc = config.cache
    if cc.window is None:
        raise ValueError("--fork kv-routing needs a rolling KV cache (cache.window set; e.g. --config shapes-long)")
    if cc.recompute_context:
        raise ValueError("--fork kv-routing routes a resident history; this model recomputes its one chunk of "
                         "context before each chunk (cache recompute_context, Krea): use --fork initial or solver")
    geo = RoutingGeometry(config.num_chunks, config.sampler.chunk_frames, cc.sink, cc.window, history, m_nearest,
                          blocks, first_chunks)  # fmt: skip
    plan_routing(geo, 1, 0, start)  # the same checks a group's planning makes
    return geo


@torch.no_grad()
def routed_group(
    sampler: Sampler,
    context: torch.Tensor,
    bank: NoiseBank,
    group_size: int,
    geometry: RoutingGeometry,
    start: int | None = None,
    routing: RoutingPlan | None = None,
    rows: tuple[int, int] | None = None,
) -> RoutedGroup:
    """A KV-routed group of `group_size` rows (anchor + group_size - 1 branches) for a one-seed `bank` and
    text context [1, L, D]; the routing is planned from the bank's seed (:func:`plan_routing`; `start`
    fixes the first perturbed chunk, the group's pivot), or given (`routing`, planned so beforehand: plan
    runs this under fake tensors, where the seeded draw cannot run).

    `rows` (start, stop): roll out only those rows (one rank's share of a group split over a branch team);
    the per-row tensors then hold those rows, the same bytes as the whole group's rows (every row runs and
    is replayed on its own)."""
    if len(bank.seeds) != 1:
        raise ValueError("routed_group takes a NoiseBank with exactly one seed")
    if group_size < 2:
        raise ValueError(f"a routed group needs the anchor and >= 1 branch (group size >= 2), got {group_size}")
    plan = routing or plan_routing(geometry, group_size - 1, bank.seeds[0], start)
    if len(plan.older) != group_size - 1:
        raise ValueError(f"the routing has {len(plan.older)} branches, the group {group_size - 1}")
    first, last = rows or (0, group_size)
    if not 0 <= first < last <= group_size:
        raise ValueError(f"rows {first}..{last - 1} are outside the group of {group_size}")
    n, pivot = geometry.num_chunks, plan.start
    prefix_cache = sampler.new_cache(1, pivot, history=geometry.history)
    prefix = [sampler.denoise_chunk(prefix_cache, j, bank, context).x0 for j in range(pivot)]
    x_t, x0s, latents, unrouted = [], [], [], []
    for row in range(first, last):
        cache = prefix_cache.expand(1)
        if row > 0:
            cache.routes = plan.routes(row - 1)
        trace = sampler.denoise_chunk(cache, pivot, bank, context, record=True)
        rest = [trace.x0] + [sampler.denoise_chunk(cache, j, bank, context).x0 for j in range(pivot + 1, n)]
        del cache  # this row's KV leaves the device before its replay and the next row
        # the row's T pivot steps replayed under the unrouted context: one batch of T rows per row, so a row's
        # bytes do not depend on which rows run beside it (a team's ranks write what one process writes)
        unrouted.append(unrouted_predictions(sampler, prefix_cache, trace.x_t, context, pivot))
        x_t.append(trace.x_t.cpu())
        x0s.append(trace.x0s.cpu())
        latents.append(torch.cat(rest, dim=1).cpu())
        del trace, rest
    x_t_all = torch.cat(x_t)
    init_noise, solver_noise = bank.shared(n, len(sampler.schedule))
    return RoutedGroup(
        pivot=pivot,
        strength=0.0,  # no noise perturbation: the rows share every noise
        seed=bank.seeds[0],
        context=torch.cat(prefix, dim=1)[0].cpu(),
        eps_star=bank.initial(pivot)[0],
        branch_noise=x_t_all[:, 0],
        init_noise=init_noise,
        solver_noise=solver_noise,
        x_t=x_t_all,
        x0_old=torch.cat(x0s),
        branch_latents=torch.cat(latents),
        routing=plan.to_json(),
        x0_unrouted=torch.cat(unrouted),
    )


def unrouted_predictions(
    sampler: Sampler, prefix, x_t: torch.Tensor, context: torch.Tensor, pivot: int
) -> torch.Tensor:
    """The policy's x0 predictions [G, T, c, C, H, W] of the pivot-chunk inputs x_t [G, T, c, C, H, W] under
    the unrouted context (the batch-1 `prefix` cache, read in place): what a replay of the group sees."""
    g, t = x_t.shape[:2]
    sched = sampler.schedule
    steps = torch.arange(t).repeat(g)
    dev = next(sampler.model.parameters()).device
    ts = torch.tensor(sched.timesteps, dtype=torch.float32)[steps].to(dev)
    sig = torch.tensor(sched.sigmas, dtype=torch.float64)[steps].to(dev)
    rows = x_t.flatten(0, 1).to(dev, torch.float32)
    pred = sampler.predict_rows(rows, ts, sig, context, prefix, pivot * sampler.chunk_frames)
    return pred.view(g, t, *pred.shape[1:]).cpu()


def routing_of(group) -> RoutingPlan | None:
    """The routing plan of a group or entry (None when it was not KV-routed)."""
    r = getattr(group, "routing", None)
    return None if r is None else RoutingPlan.from_json(r)
