"""Shared fixtures: tiny random-weight generators built in code (no downloads)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from streamalign.models.sampler import Sampler
from streamalign.models.wan import CausalWanModel
from streamalign.schemas.config import ModelConfig


def make_model(cfg: ModelConfig, seed: int = 0) -> CausalWanModel:
    """A tiny generator whose every parameter is random (the Wan init zeroes the head, which would make
    every output identical and tests unable to fail)."""
    torch.manual_seed(seed)
    model = CausalWanModel(cfg.arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_config(frames: int = 12, sink: int = 0, window: int | None = None, **arch) -> ModelConfig:
    base = ModelConfig.load("tiny")
    return base.with_overrides(
        latent={"frames": frames},
        cache={"sink": sink, "window": window},
        arch={**base.arch.model_dump(), **arch},
    )


@pytest.fixture
def tiny() -> tuple[ModelConfig, CausalWanModel, Sampler]:
    cfg = tiny_config()
    model = make_model(cfg)
    return cfg, model, Sampler(model, cfg)


@pytest.fixture
def text(tiny) -> torch.Tensor:
    cfg = tiny[0]
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 7, cfg.arch.text_dim, generator=g)


@pytest.fixture
def pids():
    """(a PID no process has any more, the PID of a process that is still running)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield done.pid, alive.pid
    alive.kill()
    alive.wait()


def torchrun(nproc: int) -> list[str]:
    """The launcher command of `nproc` local ranks on a free port (``--standalone``: a c10d rendezvous on
    localhost port 0), so concurrent test runs never collide on a master port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
