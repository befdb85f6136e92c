"""Collectives that NCCL accepts: under a CUDA launcher the group is joined with ``cpu:gloo,cuda:nccl`` on
the rank's own GPU (set_device + device_id), every tensor the real training and collection code reduces or
broadcasts lives on the communication device (forced here to the meta device, which a CPU tensor is not),
the bucketed gradient all-reduce of 2 gloo ranks equals the sum, and ``cuda`` means the rank's GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamalign import distributed
from streamalign.models.placement import resolve_device
from streamalign.pipeline import Pipeline
from streamalign.schemas.config import ModelConfig
from streamalign.train import loop
from streamalign.train import trainer as trainer_module
from streamalign.train.config import TrainConfig
from streamalign.train.memory import simulated_entry
from streamalign.train.trainer import Trainer
from tests import dist_workers
from tests.conftest import free_port, make_model

META = torch.device("meta")


class RecordedError(Exception):
    """Raised by the recording collectives: a meta tensor carries no values to continue with."""


@pytest.fixture
def recorded(monkeypatch) -> list[tuple[str, torch.device, torch.dtype]]:
    """(collective, device, dtype) of every all_reduce / broadcast; the communication device is 'meta'."""
    seen: list[tuple[str, torch.device, torch.dtype]] = []

    def record(name: str):
        def collective(t: torch.Tensor, *args, **kwargs) -> None:
            seen.append((name, t.device, t.dtype))
            raise RecordedError(name)

        return collective

    monkeypatch.setattr(dist, "all_reduce", record("all_reduce"))
    monkeypatch.setattr(dist, "broadcast", record("broadcast"))
    monkeypatch.setattr(distributed, "comm_device", lambda: META, raising=False)  # absent: CPU
    return seen


def _trainer() -> Trainer:
    """A rank-0-of-2 trainer on a random shapes generator (no process group: the collectives record)."""
    cfg = ModelConfig.load("shapes")
    settings = TrainConfig(buffer="unused", lora_rank=2, lora_alpha=4, threads=1, replay_batch=4)
    return Trainer(settings, rank=0, world=2, pipeline=Pipeline.of_model(cfg, make_model(cfg, seed=1)))


def test_under_a_cuda_launcher_the_group_is_bound_to_the_rank_gpu(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(backend, **kw):
        calls.append(("init", backend, kw.get("device_id")))
        raise RecordedError("init")

    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(RecordedError), distributed.rank_and_world():
        pass
    gpu = torch.device("cuda", 3)
    assert calls == [("set_device", gpu), ("init", "cpu:gloo,cuda:nccl", gpu)]


def test_the_communication_device_follows_the_backend(monkeypatch):
    assert distributed.comm_device() == torch.device("cpu")  # no process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    for backend, device in [("gloo", "cpu"), ("nccl", "cuda:5"), ("cpu:gloo,cuda:nccl", "cuda:5")]:
        monkeypatch.setattr(dist, "get_backend", lambda b=backend: b)
        assert distributed.comm_device() == torch.device(device), backend


def test_training_reduces_only_tensors_on_the_communication_device(recorded, monkeypatch):
    class Reader:
        shards, damaged = {"a": 0, "b": 0}, {"b"}

    with pytest.raises(RecordedError):
        loop._all_damaged(Reader(), 2)  # --skip-damaged: the shards any rank skipped
    with pytest.raises(RecordedError):
        distributed.rank0_agrees(True, 2)  # collection: rank 0's verdict on the buffer
    trainer = _trainer()
    entry = simulated_entry(trainer.policy.config, pivot=1, group_size=4, fork=trainer.objective.fork)
    with pytest.raises(RecordedError):
        trainer.update(0, [entry], 2)  # the statistics (float64, exact)
    monkeypatch.setattr(trainer_module, "all_reduce", lambda t, op=None: t)  # statistics as one rank's: on to gradients
    with pytest.raises(RecordedError):
        trainer.update(0, [entry], 2)
    assert all(p.grad is not None for p in trainer.params)  # the update did reach the gradient reduction
    assert recorded == [("all_reduce", META, torch.float64), ("broadcast", META, torch.float32),
                        ("all_reduce", META, torch.float64), ("all_reduce", META, torch.float32)]  # fmt: skip


def test_bucketed_gradient_all_reduce_of_two_gloo_ranks_is_the_sum():
    out = mp.Manager().dict()
    mp.spawn(dist_workers.sum_grads, args=(2, free_port(), out), nprocs=2)
    for i in range(len(dist_workers.SHAPES)):
        want = sum(g for r in range(2) if (g := dist_workers.ramp(i, r)) is not None)
        assert torch.equal(out[0][i], want) and torch.equal(out[1][i], want), i


def test_cuda_means_the_rank_gpu_under_a_launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit GPU stays explicit
