"""The `collect` stage as a run: a policy (model + optional adapter) and the collection's settings."""

from __future__ import annotations

import os
from pathlib import Path

from ..buffer.collection import busy_error, check_collection, lock_holder
from ..buffer.inspect import buffer_info
from ..buffer.urls import location
from ..distributed import rank_and_world
from ..io.files import write_atomic
from ..io.outputs import overwrite_permitted
from ..models.checkpoint import shipped_lora
from ..models.placement import Placement
from ..pipeline import Pipeline, resolve_config
from ..plan import check_stage, stage_reward_hold
from ..rewards import plan as _reward_planners  # noqa: F401  (registers the reward models' planners)
from ..rewards.sources import reward_of
from ..schemas.run import RUN_FILE, RunConfig, run_record
from ..schemas.sections import CacheSection, Hardware, PolicySection
from .collector import BranchTeam, CollectConfig, CollectSummary, collect, collect_folder


class CollectRun(RunConfig):
    """Roll out fork groups from a policy, score every branch and write a sharded replay buffer (re-running
    resumes). Under `torchrun --nproc_per_node N` each rank writes a disjoint set of shards; with
    `--branch-ranks n` teams of n ranks split each group's branches (the team's first rank writes)."""

    model: PolicySection = PolicySection()
    cache: CacheSection = CacheSection()
    collect: CollectConfig = CollectConfig()
    hardware: Hardware = Hardware()


def run_collect(cfg: CollectRun, out: str | Path) -> tuple[int, CollectSummary]:
    """Collect into the buffer `out` (resuming) on this rank; rank 0 records the resolved run in ``run.yaml``.
    Returns (rank, what this rank did)."""
    m, out = cfg.model, collect_folder(out)
    model = cfg.cache.apply(resolve_config(m.config, m.wan_dir))
    shipped_lora(model, m.base_lora)  # a model that ships a LoRA is refused without it before anything loads
    early = cfg.collect.resolve(model)  # other settings than the buffer's are refused before the weights load
    reward_of(early)  # reward names, paths and plug-ins checked before any model loads
    early.check(model.num_chunks)
    early.check_routing(model)
    BranchTeam.check(early.branch_ranks, int(os.environ.get("WORLD_SIZE", "1")))
    holder = lock_holder(out)
    if holder is not None:  # a live collect writes there: refused before the weights load (and again, locked)
        raise busy_error(out, holder)
    if not overwrite_permitted(out):  # --overwrite starts afresh: the old collection's settings do not apply
        check_collection(out, "", early.run_id, early.settings(model), early.groups)
    placement = Placement.of(cfg.hardware)
    routing = early.routing_settings() if early.fork == "kv-routing" else {}  # routed groups plan as they run
    sp = check_stage("collect", model, placement, early, group_size=early.group_size,
                     branch_batch=early.branch_batch, pivot=None if early.pivot == "uniform" else int(early.pivot),
                     groups=early.groups, fork=early.fork, **routing)  # fmt: skip
    hold = stage_reward_hold(early.reward_offload, sp)
    policy = Pipeline.of_section(m, placement, config=model)
    resolved = cfg.replace(collect=cfg.collect.resolve(policy.config), cache=CacheSection.of(model))
    with rank_and_world() as (rank, world):
        summary = collect(policy, resolved.collect, out, rank, world, reward_hold=hold)
    if rank == 0:
        write_atomic(out / RUN_FILE, run_record(resolved, "collect"))
        if resolved.collect.upload is not None:
            location(resolved.collect.upload).put(out / RUN_FILE, RUN_FILE)
    return rank, summary


def summary_lines(out: str | Path, s: CollectSummary) -> list[str]:
    """What `collect` prints: the buffer's totals and this run's work."""
    b = buffer_info(out)
    means = ", ".join(f"{k.removeprefix('reward_')} {v:.3f}" for k, v in b["reward_means"].items())
    stored = ", ".join(b["store_dtypes"])
    return [f"{out}: {b['groups']} groups ({b['branches']} branches) in {b['shards']} shards, "
            f"{b['bytes'] / 2**20:.1f} MiB ({b['bytes_per_group'] / 2**20:.2f} MiB per group, latents {stored}), "
            f"{b['rejected_groups']} rejected; this run wrote {s.shards_written} shards "
            f"({s.groups / max(s.seconds, 1e-9):.2f} groups/s), skipped {s.shards_skipped} finished",
            f"reward means: {means}"]  # fmt: skip


def collect_stage(cfg: CollectRun, out: Path) -> str:
    """The stage behind the command (what it prints)."""
    rank, s = run_collect(cfg, out)
    return "\n".join(summary_lines(cfg.collect.upload or out, s)) if rank == 0 else ""  # where the shards are
