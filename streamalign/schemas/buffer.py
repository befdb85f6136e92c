"""The replay-buffer entry: one fork group, versioned and validated on write and on read.

Shapes (c = chunk frames, C/H/W latent channels and size, L chunks, p pivot, G branches, T steps):

- context [p*c, C, H, W]            clean latents of the shared chunks (the prefix KV is rebuilt from them)
- eps_star [c, C, H, W]             the pivot's shared initial noise
- branch_noise [G, c, C, H, W]      each branch's initial noise at the pivot
- init_noise [L, c, C, H, W]        the shared initial noise of every chunk
- solver_noise [L, T-1, c, C, H, W] the shared solver noise of every chunk and step
- x_t [G, T, c, C, H, W]            the pivot chunk's input at every step
- x0_old [G, T, c, C, H, W]         the rollout policy's x0 prediction at every step
- branch_latents [G, (L-p)*c, C, H, W]  chunks p..L-1 of every branch
- rewards {name: float32 [G]}       every reward separately; weights in force kept in the metadata
- kv {"k.N" / "v.N": [S, heads, head_dim]}  optional stored prefix KV (``--store-kv``)
- KV-routing groups (``collect --fork kv-routing``) only: ``routing`` (metadata: the
  :class:`~streamalign.models.kv_routing.RoutingPlan` as JSON; row 0 is the unrouted anchor, row i the
  routed branch i-1) and x0_unrouted [G, T, c, C, H, W], the rollout policy's x0 prediction at every
  pivot step of every row under the unrouted (deployment-time) context. Entries without them read as before.

Latent tensors may be float32, bfloat16 or float16 (``collect --store-dtype``, by default the compute
dtype); they are stored bit-exactly. ``text_hash``: the sha256 (16 hex digits) of the prompt's token
embeddings the group was rolled out with, so a later stage can check that it encodes the prompt the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import torch

SCHEMA_VERSION = 1
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LATENT_FIELDS = ("context", "eps_star", "branch_noise", "init_noise", "solver_noise", "x_t", "x0_old", "branch_latents")
_HASH = re.compile(r"^[0-9a-f]{16}$")
LOCAL_REWARD_PREFIX = "local."  # kv-routing entries: rewards of the routed chunks' clip beside the global ones


class SchemaError(ValueError):
    """An entry does not match the buffer schema (what is wrong, where)."""


@dataclass
class GroupTensors:
    """The tensors of one fork group (shapes above): what the sampler's ``ForkGroup`` returns and what
    a buffer ``Entry`` stores, one definition for both."""

    context: torch.Tensor
    eps_star: torch.Tensor
    branch_noise: torch.Tensor
    init_noise: torch.Tensor
    solver_noise: torch.Tensor
    x_t: torch.Tensor
    x0_old: torch.Tensor
    branch_latents: torch.Tensor

    # the tensors with one row per branch (the rest are shared by the group's branches)
    BRANCH_FIELDS = ("branch_noise", "x_t", "x0_old", "branch_latents")

    @property
    def group_size(self) -> int:
        return self.branch_noise.shape[0]

    @property
    def chunk_frames(self) -> int:
        return self.eps_star.shape[0]

    def videos(self) -> torch.Tensor:
        """Full latent videos of the branches [G, L*c, C, H, W]."""
        ctx = self.context.unsqueeze(0).expand(self.group_size, *self.context.shape)
        return torch.cat([ctx, self.branch_latents], dim=1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in LATENT_FIELDS}

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the latents are held in (all of them share one)."""
        return self.x0_old.dtype

    def cast(self, dtype: torch.dtype, device: torch.device | str | None = None):
        """A copy with every latent tensor (and stored KV) in `dtype` (on `device`); tensors already there
        are shared, not copied. Rewards stay float32."""
        kw = {} if device is None else {"device": device}
        changes = {name: getattr(self, name).to(dtype=dtype, **kw) for name in LATENT_FIELDS}
        if getattr(self, "kv", None):
            changes["kv"] = {k: v.to(dtype=dtype, **kw) for k, v in self.kv.items()}
        if getattr(self, "x0_unrouted", None) is not None:
            changes["x0_unrouted"] = self.x0_unrouted.to(dtype=dtype, **kw)
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class Entry(GroupTensors):
    # identity
    entry_id: str
    run_id: str
    policy_id: str
    seed: int
    prompt: str
    prompt_id: str
    # geometry of the group
    config_name: str
    arch_id: str
    num_chunks: int
    pivot: int
    strength: float
    timesteps: list[float]
    rewards: dict[str, torch.Tensor]
    reward_weights: dict[str, float]
    kv: dict[str, torch.Tensor] = field(default_factory=dict)
    text_hash: str | None = None  # absent in entries written before it existed
    routing: dict | None = None  # KV-routing groups only (see the module docstring)
    x0_unrouted: torch.Tensor | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_fork_group(cls, group, **identity) -> Entry:
        """An entry from a :class:`~streamalign.models.sampler.ForkGroup` (its seed, pivot, strength, number
        of chunks and every tensor) plus the identity, timesteps, rewards and weights given as keywords."""
        routed = {k: getattr(group, k) for k in ("routing", "x0_unrouted") if getattr(group, k, None) is not None}
        return cls(seed=group.seed, num_chunks=group.init_noise.shape[0], pivot=group.pivot, strength=group.strength,
                   **group.tensors(), **routed, **identity)  # fmt: skip

    # -- validation ----------------------------------------------------------------------------------
    def validate(self, where: str = "entry") -> Entry:
        """Raise SchemaError naming the first inconsistency; return self when valid."""
        at = f"{where} {self.entry_id!r}"
        if self.schema_version != SCHEMA_VERSION:
            raise SchemaError(f"{at}: schema version {self.schema_version}, this streamalign reads {SCHEMA_VERSION}")
        for name in LATENT_FIELDS:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise SchemaError(f"{at}: {name} must be a float32/bfloat16/float16 tensor, got {got}")
        if self.eps_star.dim() != 4:
            raise SchemaError(f"{at}: eps_star must be [c, C, H, W], got {tuple(self.eps_star.shape)}")
        c, *chw = self.eps_star.shape
        g, n, p = self.group_size, self.num_chunks, self.pivot
        steps = len(self.timesteps)
        if not 0 <= p < n:
            raise SchemaError(f"{at}: pivot {p} is outside chunks 0..{n - 1}")
        if g < 1 or steps < 1:
            raise SchemaError(f"{at}: group size {g} and steps {steps} must be >= 1")
        if not 0.0 <= self.strength <= 1.0:
            raise SchemaError(f"{at}: strength {self.strength} must lie in [0, 1]")
        want = {
            "context": (p * c, *chw),
            "branch_noise": (g, c, *chw),
            "init_noise": (n, c, *chw),
            "solver_noise": (n, steps - 1, c, *chw),
            "x_t": (g, steps, c, *chw),
            "x0_old": (g, steps, c, *chw),
            "branch_latents": (g, (n - p) * c, *chw),
        }
        for name, shape in want.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise SchemaError(f"{at}: {name} has shape {got}, expected {shape} (G={g}, L={n}, p={p}, T={steps})")
        if not self.rewards:
            raise SchemaError(f"{at}: no rewards")
        for name, r in self.rewards.items():
            if not isinstance(r, torch.Tensor) or r.dtype != torch.float32 or tuple(r.shape) != (g,):
                raise SchemaError(f"{at}: reward {name!r} must be float32 [{g}]")
            if not torch.isfinite(r).all():
                raise SchemaError(f"{at}: reward {name!r} has NaN/inf values {r.tolist()}")
        for name, w in self.reward_weights.items():
            if name not in self.rewards or not math.isfinite(w):
                raise SchemaError(f"{at}: weight for {name!r} has no reward or is not finite")
        for name, t in self.kv.items():
            if not name.startswith(("k.", "v.")) or t.dim() != 3 or t.dtype not in FLOAT_DTYPES:
                raise SchemaError(f"{at}: stored KV {name!r} must be named k.N/v.N and be a float [S, heads, dim]")
        dtypes = {getattr(self, name).dtype for name in LATENT_FIELDS}
        if len(dtypes) > 1:
            raise SchemaError(f"{at}: latent tensors mix dtypes {sorted(map(str, dtypes))} (store one dtype)")
        if self.text_hash is not None and not _HASH.match(self.text_hash):
            raise SchemaError(f"{at}: text_hash {self.text_hash!r} is not 16 hex digits")
        self._validate_routing(at, (g, steps, c, *chw))
        return self

    def _validate_routing(self, at: str, shape: tuple[int, ...]) -> None:
        """A routed entry has both its routing and x0_unrouted, consistent with its rows and pivot."""
        if (self.routing is None) != (self.x0_unrouted is None):
            raise SchemaError(f"{at}: a KV-routing entry needs both routing and x0_unrouted")
        if self.routing is None:
            return
        r = self.routing
        try:
            older, ok = r["older"], int(r["start"]) == self.pivot and int(r["blocks"]) >= 1
        except (KeyError, TypeError, ValueError):
            raise SchemaError(f"{at}: routing {r!r} is not a KV-routing plan") from None
        if not ok or not isinstance(older, list) or len(older) != shape[0] - 1:
            raise SchemaError(f"{at}: routing must start at the pivot {self.pivot} and list {shape[0] - 1} branches")
        t = self.x0_unrouted
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != self.x0_old.dtype:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise SchemaError(f"{at}: x0_unrouted must be {self.x0_old.dtype} {shape}, got {got}")

    # -- records (what the storage backends write) ---------------------------------------------------
    def to_record(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able metadata, flat tensor dict) of a validated entry."""
        self.validate("writing entry")
        meta = {
            k: getattr(self, k)
            for k in (
                "entry_id",
                "run_id",
                "policy_id",
                "seed",
                "prompt",
                "prompt_id",
                "config_name",
                "arch_id",
                "num_chunks",
                "pivot",
                "strength",
                "timesteps",
                "reward_weights",
                "schema_version",
            )
        }
        if self.text_hash is not None:  # entries without it keep their earlier bytes
            meta["text_hash"] = self.text_hash
        tensors = {name: getattr(self, name).contiguous() for name in LATENT_FIELDS}
        if self.routing is not None:  # likewise: unrouted entries keep their bytes
            meta["routing"] = self.routing
            tensors["x0_unrouted"] = self.x0_unrouted.contiguous()
        tensors.update({f"reward.{k}": v.contiguous() for k, v in self.rewards.items()})
        tensors.update({f"kv.{k}": v.contiguous() for k, v in self.kv.items()})
        return meta, tensors

    @classmethod
    def from_record(cls, meta: dict, tensors: dict[str, torch.Tensor], where: str = "record") -> Entry:
        """Rebuild and validate an entry; missing or unexpected fields are a SchemaError."""
        try:
            entry = cls(
                **meta,
                **{name: tensors[name] for name in LATENT_FIELDS},
                **({"x0_unrouted": tensors["x0_unrouted"]} if "x0_unrouted" in tensors else {}),
                rewards={k[7:]: v for k, v in tensors.items() if k.startswith("reward.")},
                kv={k[3:]: v for k, v in tensors.items() if k.startswith("kv.")},
            )
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{where}: not a streamalign buffer entry ({e})") from None
        known = {*LATENT_FIELDS, "x0_unrouted"}
        extra = set(tensors) - known - {k for k in tensors if k.startswith(("reward.", "kv."))}
        if extra:
            raise SchemaError(f"{where}: unexpected tensors {sorted(extra)}")
        return entry.validate(where)
