"""Training configuration: one validated object, saved next to the run (``train.yaml``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..rewards.shapes import SHAPES_METRICS, SHAPES_REWARDS
from .lora import LoraSettings
from .objectives.copo import CoPO
from .objectives.nft import NFT
from .replay import CONTEXT_MODES

OBJECTIVES = ("copo", "nft", "sde-grpo")


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str = "semi"  # semi: stream a buffer, old = the stored reference predictions; on: fresh rollouts
    objective: str = "copo"
    # policy
    model: str = "shapes"  # config preset or YAML path
    checkpoint: str | None = None  # base generator weights (shapes: the shipped ones)
    wan_dir: str | None = None
    init_adapter: str | None = None  # continue training this peft adapter
    lora_rank: int = 64
    lora_alpha: float = 128.0
    # optimisation
    steps: int = Field(100, gt=0)  # optimizer updates (semi) / iterations (on)
    batch_groups: int = Field(8, gt=0)  # fork groups per update, over all ranks
    accum: int = Field(1, gt=0)  # batches accumulated into one update
    lr: float = 1e-5
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup: int = Field(0, ge=0)
    seed: int = 0
    # objective
    anchors: int = 4
    pivot_steps: int | None = None  # denoising steps of the pivot used per group (None: all)
    tau: float | None = None  # None: adaptive (median off-anchor distance of the old policy x tau_scale)
    tau_scale: float = 1.0
    clip_eps: float = 1e-4
    clip: bool = True  # False: the off-policy ablation
    context: str = "recompute"  # recompute | stored prefix KV
    # NFT (--objective nft)
    nft_beta: float = 0.1
    kl_w: float = 1e-4
    kappa: float = 0.1  # initial selective-KL fraction, adapted within [0.02, 0.2]
    kl_target: float = 1e-3
    ref_reset_kl: float = 1.0
    old_decay_rate: float = 1e-3
    old_decay_max: float = 0.5
    primary_reward: str | None = None
    # semi-on-policy data
    buffer: str | None = None
    shuffle: int = 64
    filter: str | None = None
    reward_weights: dict[str, float] | None = None
    # on-policy rollouts
    prompts: tuple[str, ...] = ()
    group_size: int = 12
    strength: float = 0.5
    updates_per_iter: int = Field(2, gt=0)
    rewards: str = SHAPES_REWARDS
    metrics: str = SHAPES_METRICS
    format: str = "webdataset"
    clip_chunks: int | None = None  # on-policy streaming long tuning: score the clip of this many chunks
    # bookkeeping
    save_every: int = Field(50, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: no evaluation during training
    eval_prompts: tuple[str, ...] = ()
    eval_seed: int = 1_000_000
    threads: int | None = None
    wandb: bool = False
    # hardware: auto = cuda:LOCAL_RANK when CUDA is available, else cpu; autocast auto = bf16 on CUDA, off on
    # CPU (bf16 forces CPU autocast too, for checks). LoRA weights and the optimizer stay fp32 either way
    device: str = "auto"
    autocast: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.mode not in ("semi", "on"):
            raise ValueError(f"--mode must be 'semi' or 'on', got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not 0 < self.lr <= 1:
            raise ValueError(f"--lr {self.lr} is out of range (0, 1]")
        if self.mode == "semi" and self.buffer is None:
            raise ValueError("--mode semi needs --buffer DIR (a buffer written by `streamalign collect`)")
        if self.mode == "on" and not self.prompts:
            raise ValueError("--mode on needs prompts (--prompts FILE, or the shapes world's held-in set)")
        if self.mode == "on" and not 2 <= self.group_size <= 256:
            raise ValueError(f"--group-size {self.group_size} must lie in 2..256 (advantages need >= 2 branches)")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"--autocast must be auto, bf16 or off, got {self.autocast!r}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.context not in CONTEXT_MODES:
            raise ValueError(f"--context must be one of {', '.join(CONTEXT_MODES)}, got {self.context!r}")
        LoraSettings(self.lora_rank, self.lora_alpha).check()
        CoPO(self.anchors, self.pivot_steps, self.tau, self.tau_scale, self.clip_eps, self.clip).check()
        self.nft().check()
        return self

    def nft(self) -> NFT:
        return NFT(
            beta=self.nft_beta, kl_w=self.kl_w, kappa=self.kappa, kl_target=self.kl_target,
            ref_reset_kl=self.ref_reset_kl, decay_rate=self.old_decay_rate, decay_max=self.old_decay_max,
            primary=self.primary_reward,
        )  # fmt: skip
