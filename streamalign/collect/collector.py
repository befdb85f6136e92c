"""collect: roll out fork groups from a policy, score every branch, write shards + manifest parts.

Work is cut into shards of ``entries_per_shard`` groups; group i always gets the same prompt
(round-robin), seed ``derive_seed(seed, 2, i)`` and pivot, so a shard's bytes depend only on the
arguments. Rank r of a world of n processes writes the shards k with ``k % n == r``. A shard and then its
manifest part are finalized atomically; re-running the same command skips finished shards (resume, no
duplicates) and removes the temporaries of killed runs (never those of a live process). Groups with
NaN/inf rewards are rejected, counted and logged in the manifest part's metadata, never written.

The collection's settings are recorded in the buffer before its first shard and a re-run with other
ones is refused (``buffer.collection``); a larger ``--groups`` extends it. Rank 0 holds the buffer's
lock while the collection runs, so a second collect into the same folder is refused naming the holder.
When every shard is written, rank 0 writes the collection's integrity record (``buffer.integrity``); a
re-run checks the parts it keeps against the record it finds, so an edited part is never recorded as good.

``branch_ranks`` n: teams of n consecutive ranks take shards as single ranks do; every rank of a team
computes each group's prefix and rolls out its G/n branches, the team's first rank gathers them, scores
and writes (same bytes as one process when the branch batch divides G/n). ``upload``: each finished
shard, then its manifest part, is put at a buffer URL and the local shard deleted (the local manifest
parts say what is done).
A group's G branches are scored as one batch (each reward model splits it by its ``batch_size``); reward
models load once per process (``rewards.sources``). ``--background-scoring`` scores group i in a worker
thread while group i+1 rolls out: the same entries in the same order, at most one group waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field

from ..buffer.collection import BufferLock, Collection, claim_collection, read_collection, record_path, shard_name
from ..buffer.formats import FormatName, ShardFormat, ShardInfo, get_format, write_shard
from ..buffer.integrity import IntegrityError, Seal, part_of, part_problem, read_seal, seal_collection
from ..buffer.manifest import MANIFEST_DIR, write_index, write_manifest_part
from ..buffer.urls import local_folder, location
from ..distributed import barrier, gather_rows, rank0_agrees, team_agrees, team_groups
from ..io.files import checksum, remove_path, tree_bytes, write_atomic
from ..io.outputs import check_output, is_empty, open_output
from ..io.progress import progress_bar
from ..models.kv_cache import compute_dtype
from ..models.kv_routing import RoutingGeometry
from ..models.noise import derive_seed
from ..models.placement import DTYPES
from ..models.routed_group import routed_group, routing_geometry
from ..models.sampler import ForkGroup, Sampler
from ..pipeline import Pipeline
from ..rewards import CompositeReward
from ..rewards.sources import reward_of
from ..schemas.buffer import LOCAL_REWARD_PREFIX, Entry, SchemaError
from ..schemas.config import ModelConfig
from ..schemas.run import arg
from ..schemas.sections import DtypeName, PromptSection, RewardSection, RoutingSection
from ..worlds import default_prompts, default_rewards

# the arguments a collection's id hashes (fields added later hash only when they differ from their default)
RUN_ID_FIELDS = ("prompts", "groups", "group_size", "strength", "pivot", "seed", "format", "entries_per_shard",
                 "store_kv", "rewards", "metrics", "fork", "clip_chunks", "store_dtype", "kv_history", "m_nearest",
                 "perturb_blocks", "perturb_first")  # fmt: skip
LATER_FIELDS = {
    "fork": "initial",
    "clip_chunks": None,
    "store_dtype": "auto",
    "kv_history": 21,
    "m_nearest": 4,
    "perturb_blocks": 5,
    "perturb_first": 7,
}  # hashed only when not these

log = logging.getLogger("streamalign.collect")


class CollectConfig(PromptSection, RewardSection, RoutingSection):
    """Collection"""

    groups: int = arg(64, "Fork groups to collect.")
    group_size: int = arg(12, "Branches per group.", short="-G")
    strength: float = arg(0.5, "Perturbation strength of the pivot's initial noise.", flag="--sigma")
    pivot: str = arg("uniform", "'uniform' or a fixed 0-based chunk index.")
    seed: int = arg(0, "Seed of every group's noise and pivot.")
    format: FormatName = arg("webdataset", "Shard format.")
    entries_per_shard: int = arg(16, "Groups per shard.")
    store_kv: bool = arg(False, "Also store the prefix KV of each group.")
    fork: Literal["initial", "solver", "kv-routing"] = arg(
        "initial", "initial: branches differ in the pivot's initial noise; solver: in its re-noising; kv-routing: "
        "in the cached frames they attend to (KVPO; row 0 the anchor, rolling cache only).")  # fmt: skip
    # streaming long tuning: score only the clip of this many chunks that starts at the pivot (pivots drawn
    # so the clip fits); None scores the whole video
    clip_chunks: int | None = arg(None, "Streaming: score only this many chunks from the pivot (long configs).")
    store_dtype: DtypeName = arg("auto", "Dtype of the stored latents: auto (the compute dtype) | fp32 | bf16 | fp16.")
    # how many branches run at once: memory only (branch i's output does not depend on it), not in the run id
    branch_batch: int | None = Field(None, ge=1, description="Branches rolled out at once (default: from memory).")
    # how many ranks share one group's branches: where the work runs only (the entries' bytes do not change)
    branch_ranks: int = Field(1, ge=1, description="Ranks that split each fork group's branches (torchrun; "
                              "divides -G and the number of ranks).")  # fmt: skip
    # where the shards end up: the bytes are the same wherever they go, so not in the run id either
    upload: str | None = Field(None, description="Put each finished shard, then its manifest part, at this "
                               "buffer URL (s3://, gs://, file://) and delete the local shard (--out keeps the "
                               "manifest).")  # fmt: skip
    # throughput only (entries are the same bytes either way), not in the run id
    background_scoring: bool = arg(False, "Score each group in a worker thread while the next one rolls out.")

    def latent_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype entries store their latents in (auto: the generator's compute dtype)."""
        return compute if self.store_dtype == "auto" else DTYPES[self.store_dtype]

    def resolve(self, model: ModelConfig) -> CollectConfig:
        """Prompts and rewards from the model's world where none are given."""
        rewards, metrics = default_rewards(model, self.rewards, self.metrics)
        prompts = default_prompts(model, self.prompts, self.prompt_set)
        return self.model_copy(update={"prompts": prompts, "rewards": rewards, "metrics": metrics})

    def check(self, num_chunks: int) -> None:
        if not self.prompts:
            raise ValueError("no prompts: give --prompts FILE (one per line) or use the shapes world")
        if self.groups < 1 or self.entries_per_shard < 1:
            raise ValueError(f"--groups ({self.groups}) and --entries-per-shard must be >= 1")
        if not 2 <= self.group_size <= 256:
            raise ValueError(f"--group-size {self.group_size} must lie in 2..256 (advantages need >= 2 branches)")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"--sigma {self.strength} must lie in (0, 1]")
        if self.pivot != "uniform" and not (self.pivot.isdigit() and int(self.pivot) < num_chunks):
            raise ValueError(f"--pivot must be 'uniform' or a chunk index 0..{num_chunks - 1}, got {self.pivot!r}")
        get_format(self.format)
        if self.upload is not None:  # refused before any work: a read-only URL, a missing fsspec package
            if self.upload.startswith("pipe:"):
                raise ValueError(f"--upload {self.upload}: pipe: URLs are read-only; upload to s3://, gs:// or file://")
            location(self.upload)
        if self.group_size % self.branch_ranks:
            raise ValueError(f"--branch-ranks {self.branch_ranks} must divide -G {self.group_size} "
                             "(each rank rolls out G/N branches of every group)")  # fmt: skip
        if self.fork not in ("initial", "solver", "kv-routing"):
            raise ValueError(f"--fork must be 'initial', 'solver' or 'kv-routing', got {self.fork!r}")
        if self.clip_chunks is not None and not 1 <= self.clip_chunks <= num_chunks:
            raise ValueError(f"--clip-chunks {self.clip_chunks} must lie in 1..{num_chunks} (the video's chunks)")
        if self.clip_chunks is not None and self.pivot != "uniform" and int(self.pivot) + self.clip_chunks > num_chunks:
            raise ValueError(
                f"--pivot {self.pivot} + --clip-chunks {self.clip_chunks} runs past the {num_chunks} chunks"
            )

    def check_routing(self, model: ModelConfig) -> tuple[RoutingGeometry | None, int | None]:
        """KV routing: (the checked geometry, the fixed start chunk or None); raises ValueError when the
        model's cache or the routing flags leave no chunk to start at. (None, None) for other forks."""
        if self.fork != "kv-routing":
            return None, None
        start = None if self.pivot == "uniform" else int(self.pivot)
        return routing_geometry(model, self.kv_history, self.m_nearest, self.perturb_blocks, self.perturb_first,
                                start), start  # fmt: skip

    @property
    def run_id(self) -> str:
        """Stable id of the collection's arguments (entry ids derive from it)."""
        args = self.model_dump(mode="json", include=self._content_fields())
        args["prompts"] = list(self.prompts or ())
        for key, default in LATER_FIELDS.items():  # later fields: earlier ids stay valid
            if args.get(key, default) == default:
                args.pop(key, None)
        return "r" + hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]

    def _content_fields(self) -> set[str]:
        """The fields that decide a collection's content: the routing settings only for KV-routed groups."""
        fields = set(RUN_ID_FIELDS)
        return fields if self.fork == "kv-routing" else fields - set(RoutingSection.model_fields)

    def settings(self, model: ModelConfig, policy_id: str | None = None) -> dict:
        """The settings that decide the collection's content, by flag (what a re-run must repeat; the
        number of groups may grow). Without `policy_id` the weights are not compared (a check made before
        they load)."""
        flags = {name: (info.json_schema_extra or {}).get("flag", "--" + name.replace("_", "-"))
                 for name, info in type(self).model_fields.items()}  # fmt: skip
        args = self.model_dump(mode="json", include=self._content_fields() - {"groups"})
        out = {"--config": model.name, **{flags[k]: v for k, v in sorted(args.items())}}
        # where the rewards come from (only when given: buffers written before these fields compare equal)
        out.update({flags[k]: getattr(self, k) for k in ("reward_paths", "reward_options", "reward_plugins")
                    if getattr(self, k)})  # fmt: skip
        if model.cache.window is not None or model.cache.sink:  # (global caches: as buffers always compared)
            out["cache (--sink, --window)"] = [model.cache.sink, model.cache.window]
        if policy_id is not None:
            out["weights (--checkpoint, --lora, --lora-alpha)"] = policy_id
        return out

    def pivot_of(self, i: int, num_chunks: int) -> int:
        if self.pivot != "uniform":
            return int(self.pivot)
        return derive_seed(self.seed, 4, i) % (num_chunks - (self.clip_chunks or 1) + 1)


@dataclass(frozen=True)
class BranchTeam:
    """The ranks that split each fork group's branches: `size` ranks, this one the `index`-th; the first
    gathers the group, scores and writes it. `group`: the team's process group (None when alone)."""

    size: int = 1
    index: int = 0
    group: object = None

    @staticmethod
    def check(size: int, world: int) -> None:
        if world % size:
            raise ValueError(f"--branch-ranks {size} must divide the {world} ranks of the run "
                             "(torchrun --nproc_per_node x --nnodes)")  # fmt: skip

    @classmethod
    def of(cls, size: int, world: int) -> BranchTeam:
        """This rank's team in a world of `world` ranks split into teams of `size` consecutive ranks."""
        cls.check(size, world)
        return cls() if size == 1 else cls(size, *team_groups(size))

    def share(self, group_size: int) -> tuple[int, int] | None:
        """The branches this rank rolls out (None: all of them)."""
        n = group_size // self.size
        return None if self.size == 1 else (self.index * n, (self.index + 1) * n)

    def gather(self, group: ForkGroup) -> ForkGroup | None:
        """The whole group on the team's first rank (the ranks' branch rows in order), None elsewhere."""
        if self.size == 1:
            return group
        rows = {name: gather_rows(getattr(group, name), self.group) for name in group.BRANCH_FIELDS}
        return None if self.index else dataclasses.replace(group, **rows)


@dataclass
class CollectSummary:
    shards_written: int = 0
    shards_skipped: int = 0
    groups: int = 0
    rejected: int = 0
    bytes: int = 0
    seconds: float = 0.0


def prefix_kv(sampler: Sampler, context: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pivot's prefix KV (k.N / v.N [S, heads, head_dim]) rebuilt from clean context latents
    [p*c, C, H, W] (text [1, L, D])."""
    if sampler.config.cache.window is not None:
        raise ValueError("--store-kv needs a global cache config (cache.window: null)")
    cache = sampler.new_cache(1)
    sampler.write_context(cache, context.unsqueeze(0), text)
    s = context.shape[0] * sampler.config.tokens_per_frame
    return {f"{kind}.{i}": t[0, :s].clone() for kind in "kv" for i, t in enumerate(getattr(cache, kind))}


@dataclass
class RolledGroup:
    """Fork group i rolled out and decoded, not yet scored: its videos [G, F, 3, H, W] (floats in [0, 1], or
    uint8 levels when every reward reads 8-bit frames first), the group's tensors and the entry's identity
    fields (everything but the rewards)."""

    i: int
    prompt: str
    group: ForkGroup
    videos: torch.Tensor
    identity: dict
    store_dtype: torch.dtype
    local_videos: torch.Tensor | None = None  # kv-routing: the routed chunks' clip, scored as ``local.NAME``


@torch.no_grad()
def roll_out_group(policy: Pipeline, cfg: CollectConfig, i: int, run_id: str | None = None,
                   team: BranchTeam = BranchTeam(), uint8: bool = False) -> RolledGroup | None:  # fmt: skip
    """Fork group i (prompt, seed and pivot fixed by i) rolled out and decoded. `run_id`: the collection's
    (default: that of `cfg`; an extended collection keeps its first one). In a branch `team` every rank
    computes the prefix and rolls out its share of the branches; the first rank gathers them (None
    elsewhere). `uint8`: the videos wait as uint8 levels (a quarter of float32's bytes; the reward models
    convert them batch by batch), for rewards that read 8-bit frames first (``CompositeReward.reads_levels``)."""
    run_id = run_id or cfg.run_id
    prompt = cfg.prompts[i % len(cfg.prompts)]
    seed = derive_seed(cfg.seed, 2, i)
    n = policy.config.num_chunks
    pivot = cfg.pivot_of(i, n)
    sampler = policy.sampler
    text = policy.text.encode([prompt])
    local = None
    c = sampler.chunk_frames
    if cfg.fork == "kv-routing":  # the start chunk is drawn among those eligible (or the fixed --pivot)
        geo, start = cfg.check_routing(policy.config)
        group = routed_group(sampler, text, sampler.noise_bank(seed), cfg.group_size, geo, start,
                             rows=team.share(cfg.group_size))  # fmt: skip
        group = team.gather(group)
        if group is None:
            return None
        pivot = group.pivot
        latents = group.videos()
        local = policy.decode(latents[:, pivot * c : (pivot + cfg.perturb_blocks) * c], uint8=uint8)
        latents = latents[:, pivot * c :] if cfg.clip_chunks is None else latents  # global: the post-fork video
    else:
        group = sampler.fork_group(text, sampler.noise_bank(seed), pivot, cfg.group_size, cfg.strength, fork=cfg.fork,
                                   branch_batch=cfg.branch_batch, branches=team.share(cfg.group_size))  # fmt: skip
        group = team.gather(group)
        if group is None:
            return None
        latents = group.videos()
    if cfg.clip_chunks is not None:  # streaming: the local clip that starts at the pivot
        latents = latents[:, pivot * c : (pivot + cfg.clip_chunks) * c]
    identity = dict(
        entry_id=f"{run_id}-{i:07d}",
        run_id=run_id,
        policy_id=policy.policy_id,
        prompt=prompt,
        prompt_id=hashlib.sha256(prompt.encode()).hexdigest()[:12],
        config_name=policy.config.name,
        arch_id=policy.config.arch_id,
        timesteps=[float(t) for t in sampler.schedule.timesteps],
        kv=prefix_kv(sampler, group.context, text) if cfg.store_kv else {},
        text_hash=policy.text.embedding_hash(prompt),
    )
    store = cfg.latent_dtype(compute_dtype(policy.model))
    return RolledGroup(i, prompt, group, policy.decode(latents, uint8=uint8), identity, store, local)


@torch.no_grad()
def score_group(rolled: RolledGroup, reward: CompositeReward) -> Entry:
    """The scored entry of a rolled-out group, its latents on the CPU in the store dtype (the G branches
    scored as one batch: each reward splits it as its model needs); raises SchemaError on bad rewards."""
    prompts = [rolled.prompt] * rolled.videos.shape[0]
    scores = reward(rolled.videos, prompts)
    scores.pop("composite")
    rewards = {k: v.float().cpu() for k, v in scores.items()}
    if rolled.local_videos is not None:
        local = reward(rolled.local_videos, prompts)
        local.pop("composite")
        rewards.update({LOCAL_REWARD_PREFIX + k: v.float().cpu() for k, v in local.items()})
    entry = Entry.from_fork_group(rolled.group, rewards=rewards, reward_weights=reward.weights, **rolled.identity)
    return entry.cast(rolled.store_dtype, "cpu").validate("collected group")


def collect_group(policy: Pipeline, cfg: CollectConfig, reward: CompositeReward, i: int, run_id: str | None = None,
                  team: BranchTeam = BranchTeam()) -> Entry | None:  # fmt: skip
    """Fork group i rolled out and scored (:func:`roll_out_group` then :func:`score_group`; None on the
    branch ranks of a `team` other than its first)."""
    rolled = roll_out_group(policy, cfg, i, run_id, team, reward.reads_levels)
    return None if rolled is None else score_group(rolled, reward)


Outcome = Entry | SchemaError  # a group's entry, or why it was rejected


def _outcome(fn, *args) -> Outcome:
    try:
        return fn(*args)
    except SchemaError as e:
        return e


def _in_caller_context(fn):
    """`fn` run in a worker thread under the caller's thread-local torch state (autocast per device type,
    the current CUDA device); grad mode is set by the functions themselves."""
    casts = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def run(*args):
        if cuda is not None:
            torch.cuda.set_device(cuda)
        with contextlib.ExitStack() as stack:
            for dev, dtype in casts:
                stack.enter_context(torch.autocast(dev, dtype=dtype))
            return fn(*args)

    return run


def scored_groups(policy: Pipeline, cfg: CollectConfig, reward: CompositeReward, indices: Iterable[int],
                  run_id: str | None = None, team: BranchTeam = BranchTeam()
                  ) -> Iterator[tuple[int, Outcome]]:  # fmt: skip
    """(i, entry or rejection) of every group in `indices`, in order. With ``cfg.background_scoring`` group
    i is scored in one worker thread while group i+1 rolls out (at most one group waits for its scores);
    the entries are the same either way, and a reward's error is raised here as it would be without."""
    if not cfg.background_scoring:
        for i in indices:
            yield i, _outcome(collect_group, policy, cfg, reward, i, run_id, team)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="streamalign-scoring") as pool:
        pending: tuple[int, Future] | None = None
        for i in indices:
            rolled = _outcome(roll_out_group, policy, cfg, i, run_id, team, reward.reads_levels)
            if pending is not None:
                yield pending[0], pending[1].result()
                pending = None
            if isinstance(rolled, SchemaError):
                yield i, rolled
            else:
                pending = (i, pool.submit(_in_caller_context(_outcome), score_group, rolled, reward))
        if pending is not None:
            yield pending[0], pending[1].result()


def claim(out: Path, policy: Pipeline, cfg: CollectConfig, rank: int, world: int, prefix: str) -> Collection:
    """Rank 0 checks the settings against the buffer's record and records the collection; every rank
    then reads the same record (a refusal on rank 0 stops every rank)."""
    fmt = get_format(cfg.format)
    error = None
    if rank == 0:
        try:
            settings = cfg.settings(policy.config, policy.policy_id)
            claim_collection(out, prefix, fmt.suffix, cfg.run_id, cfg.entries_per_shard, settings, cfg.groups)
        except ValueError as e:
            error = e
    if not rank0_agrees(error is None, world):
        raise error or ValueError(f"rank 0 refused the collection into {out} (see its error)")
    return read_collection(record_path(out, prefix))


def prepare(cfg: CollectConfig, model: ModelConfig, reward_hold: str | None = None,
            load: bool = False) -> tuple[CollectConfig, ShardFormat, CompositeReward]:  # fmt: skip
    """Every input check of a collection, before it writes anything: (the settings resolved for `model`,
    its shard format, its reward; `reward_hold` and `load` as ``rewards.sources.reward_of``'s)."""
    cfg = cfg.resolve(model)
    cfg.check(model.num_chunks)
    cfg.check_routing(model)
    return cfg, get_format(cfg.format), reward_of(cfg, hold=reward_hold, load=load)


def collect(
    policy: Pipeline,
    cfg: CollectConfig,
    out: str | Path,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    shard_prefix: str = "",
    reward_hold: str | None = None,
) -> CollectSummary:
    """Write this rank's shards of the collection into `out` (resuming); returns what it did.
    `shard_prefix` lets several collections share one buffer folder (on-policy iterations); `reward_hold`:
    keep | cpu, the reward models between scoring calls (default: ``--reward-offload`` without a plan,
    auto as keep); kept ones on a GPU load before the first rollout, so its branch batch counts them."""
    cfg, fmt, reward = prepare(cfg, policy.config, reward_hold, load=True)
    team = BranchTeam.of(cfg.branch_ranks, world)
    out = collect_folder(out)
    # rank 0: checked, locked, then created (with its marker), replaced (--overwrite) or cleaned of killed
    # runs' temporaries, once all is valid
    with locked_output(out) if rank == 0 else contextlib.nullcontext():
        barrier()
        with undone_unless_durable(out, shard_prefix) if rank == 0 else contextlib.nullcontext():
            record = claim(out, policy, cfg, rank, world, shard_prefix)
            summary = _collect_shards(policy, cfg, fmt, reward, out, record, rank, world, progress, team)
        if world > 1:
            dist.barrier()  # the lock is released only when every rank is done
        if rank == 0:  # every rank's parts are written: record them, then list them for readers that cannot
            seal_collection(out, record, cfg.upload)  # list (pipe: URLs)
            write_index(out)
            if cfg.upload is not None:  # the records and the index beside the uploaded parts
                remote = location(cfg.upload)
                for f in sorted((out / MANIFEST_DIR).glob("*")):
                    if f.is_file() and f.suffix in (".json", ".txt"):
                        remote.put(f, f"{MANIFEST_DIR}/{f.name}")
    return summary


@contextlib.contextmanager
def undone_unless_durable(out: Path, prefix: str) -> Iterator[None]:
    """A collection that fails before its first shard is finished (shard and manifest part) leaves its
    record as it was (none, or the one it extended): a leftover record would pin the settings of the next
    collect into `out` for a collection that holds nothing. One that fails later keeps it: a re-run resumes."""
    record, manifest = record_path(out, prefix), out / MANIFEST_DIR
    before = record.read_bytes() if record.is_file() else None
    parts = set(manifest.glob("*.parquet"))
    try:
        yield
    except BaseException:
        if set(manifest.glob("*.parquet")) <= parts:
            if before is None:
                record.unlink(missing_ok=True)
            else:
                write_atomic(record, before)
            with contextlib.suppress(OSError):  # an empty manifest folder (this run made it) goes too
                manifest.rmdir()
        raise


@contextlib.contextmanager
def locked_output(out: Path) -> Iterator[None]:
    """Open the buffer folder `out` with its writer lock held throughout: taken before anything in the
    folder is moved or deleted, so a live collect's buffer is never touched (refused naming its PID). With
    ``--overwrite`` the fresh folder is locked too before it is swapped in, and the lock held from then on."""
    check_output(out, "collect")
    held: list[BufferLock] = []
    old = BufferLock(out).__enter__() if out.is_dir() and not is_empty(out) else None  # (empty: nothing to touch)
    try:
        open_output(out, "collect", lambda fresh: held.append(BufferLock(fresh).__enter__()))
        if held:  # swapped: the old folder (its lock file with it) is gone
            held[0].moved(out)
        else:
            held.append(old or BufferLock(out).__enter__())
            old = None
    except BaseException:
        for lock in held:
            lock.__exit__(None, None, None)
        raise
    finally:
        if old is not None:
            old.__exit__(None, None, None)
    try:
        yield
    finally:
        held[0].__exit__(None, None, None)


def upload_shard(cfg: CollectConfig, path: Path, part: Path) -> None:
    """Put a finished shard, then its manifest part, at ``cfg.upload`` (a reader there never finds a part
    whose shard is missing), then delete the local shard: its local manifest part says it is done."""
    remote = location(cfg.upload)
    remote.put(path, path.name)
    remote.put(part, f"{MANIFEST_DIR}/{part.name}")
    remove_path(path)


def collect_folder(out: str | Path) -> Path:
    """The local folder `collect` writes (a path or file:// URL); other URLs are refused before any work."""
    return local_folder(out, "collect --out", "collect into a local folder (or one your store mounts), copy it "
                        "to the store, then read it through its URL (s3://, gs://, pipe:)")  # fmt: skip


def _collect_shards(policy: Pipeline, cfg: CollectConfig, fmt: ShardFormat, reward: CompositeReward, out: Path,
                    record: Collection, rank: int, world: int, progress: bool, team: BranchTeam = BranchTeam()
                    ) -> CollectSummary:  # fmt: skip
    """Write this rank's shards of the recorded plan that are not finished yet. Branch teams take shards
    as ranks do alone (team t of n: the shards k with ``k % n == t``); their first rank decides what is
    left to do, reads and writes, the others only roll out their branches."""
    teams, me, writer = world // team.size, rank // team.size, team.index == 0
    mine = [(k, lo, hi) for k, lo, hi in record.plan() if k % teams == me]
    # every prompt of this rank's groups encoded once, up front (then the encoder may leave the device)
    policy.text.prefetch([cfg.prompts[i % len(cfg.prompts)] for _, lo, hi in mine for i in range(lo, hi)])
    summary, t0 = CollectSummary(), time.time()
    total = sum(hi - lo for _, lo, hi in mine)
    desc = f"collect[{rank}]" if world > 1 else "collect"
    bar = progress_bar(total=total, desc=desc, unit="group", show=progress and writer)
    paths = {k: out / shard_name(k, fmt.suffix, record.prefix) for k, _, _ in mine}
    parts = {k: out / MANIFEST_DIR / f"{paths[k].name}.parquet" for k in paths}
    # a shard is rolled out unless it is on disk, or uploaded (its local manifest part says so)
    needed = {k: not paths[k].exists() and not (cfg.upload is not None and parts[k].exists()) for k in paths}
    if team.size > 1:  # the writer's view of the files decides for the whole team, before any roll-out, so
        needed = {k: team_agrees(writer and v, team.group) for k, v in needed.items()}  # gathers stay in step
    # the groups of the shards to roll out, as one stream (background scoring overlaps across shards)
    todo = [i for k, lo, hi in mine if needed[k] for i in range(lo, hi)]
    if not writer:  # a branch rank: its share of every group the team's writer rolls out
        for i in todo:
            roll_out_group(policy, cfg, i, record.run_id, team)
        bar.close()
        summary.seconds = time.time() - t0
        return summary
    sealed = read_seal(out, record.prefix)  # a finished part must still be what the record says
    with contextlib.closing(scored_groups(policy, cfg, reward, todo, record.run_id, team)) as groups:
        for k, lo, hi in mine:
            path, part = paths[k], parts[k]
            if path.exists() and part.exists() and cfg.upload is not None:
                upload_shard(cfg, path, part)  # killed before its local copy was deleted: put it again
            if part.exists() and (path.exists() or cfg.upload is not None):
                _check_sealed(sealed, out, path.name)
                summary.shards_skipped += 1
                bar.update(hi - lo)
                continue
            if path.exists():  # killed between the shard and its manifest part: the shard is complete
                known = sealed.shards.get(path.name) if sealed is not None else None
                entries = list(fmt.read(path, known.checksum if known is not None else None))
                info = ShardInfo(path, fmt.name, len(entries), tree_bytes(path), checksum(path))
                rejected: list[dict] = []
            else:
                entries, rejected = [], []
                for i, got in itertools.islice(groups, hi - lo):
                    if isinstance(got, SchemaError):
                        log.warning("group %d rejected: %s", i, got)
                        rejected.append({"group": i, "reason": str(got)})
                    else:
                        entries.append(got)
                    bar.update(1)
                info = write_shard(fmt, path, entries)
                summary.shards_written += 1
                summary.bytes += info.bytes
            write_manifest_part(out, entries, info, extra={"rejected": rejected})
            if cfg.upload is not None:
                upload_shard(cfg, path, part)
            summary.groups += len(entries)
            summary.rejected += len(rejected)
    bar.close()
    summary.seconds = time.time() - t0
    return summary


def _check_sealed(sealed: Seal | None, out: Path, shard: str) -> None:
    """A finished shard's manifest part, kept by a re-run, must match the collection's record (a re-run
    never records an edited part as good)."""
    rel = part_of(shard)
    problem = None if sealed is None or rel not in sealed.parts else part_problem(rel, (out / rel).read_bytes(),
                                                                                  sealed.parts[rel])  # fmt: skip
    if problem is not None:
        raise IntegrityError(f"buffer {out}: {problem}")
