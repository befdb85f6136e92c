"""Shared fixtures: tiny random-weight generators built in code (no downloads); free ports for the
multi-process tests; every test marked ``unit`` or ``integration`` by its file (``INTEGRATION``)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamalign.models.sampler import Sampler
from streamalign.models.wan import CausalWanModel
from streamalign.schemas.config import ModelConfig

# files whose tests drive a command (the CLI, a subprocess, a launcher with several processes) or run whole
# stages end to end; every other test file holds unit tests of one component, called in process.
# `python -m pytest -m 'unit and not slow'` (a -m given replaces the default `-m 'not slow'` of pyproject.toml)
INTEGRATION = frozenset({
    "test_branch_ranks.py", "test_buffer_cli.py", "test_cli_conventions.py", "test_collect.py",
    "test_collect_overlap.py", "test_crash_matrix.py", "test_distributed.py", "test_dtype_device.py",
    "test_error_catalogue.py", "test_experiments.py", "test_floors.py", "test_gpu_check.py", "test_integrity.py",
    "test_merge_evaluate.py", "test_outputs.py", "test_readme.py", "test_reward_sources.py", "test_run_config.py",
    "test_shard_base.py", "test_streaming.py", "test_train.py", "test_train_gain.py", "test_trust.py", "test_urls.py",
    "test_vbench.py",
})  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test ``integration`` (its file is in INTEGRATION) or ``unit``."""
    missing = INTEGRATION - {p.name for p in Path(__file__).parent.glob("test_*.py")}
    if missing:
        raise pytest.UsageError(f"tests/conftest.py INTEGRATION names files that do not exist: {sorted(missing)}")
    for item in items:
        item.add_marker(pytest.mark.integration if item.path.name in INTEGRATION else pytest.mark.unit)


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it), for a test's ``--master_port``: hard-coded
    ports collide when two test runs, or two tests, share a machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """The launcher command of `nproc` local ranks on a free master port (:func:`free_port`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port())]  # fmt: skip
