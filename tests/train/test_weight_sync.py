"""The weight-sync transports apart from Ray: which one a recipe gets, and CUDA IPC between two processes on a GPU.

The object store and collective transports run on real actors in tests/train/test_workers.py; CUDA IPC with a real
engine and trainer in tests/train/test_gpu_colocation.py (GPU).
"""
from __future__ import annotations

import pytest
import torch

from sse_rl import weight_sync
from sse_rl.config import Recipe, RolloutConfig, TrainConfig
from sse_rl.weight_sync.collective import Collective
from sse_rl.weight_sync.cuda_ipc import CudaIpc
from sse_rl.weight_sync.object_store import ObjectStore


def test_the_recipe_picks_its_transport():
    cpu = weight_sync.build(Recipe())
    assert type(cpu) is ObjectStore and cpu.dtype == "float32" and not cpu.colocated
    # auto: engine r and trainer rank r fit on one GPU together -> CUDA IPC, which places them as pairs
    shared = weight_sync.build(Recipe(rollout=RolloutConfig(num_gpus_per_engine=0.4, dtype="bfloat16"),
                                      train=TrainConfig(num_gpus_per_trainer=0.5)))
    assert type(shared) is CudaIpc and shared.dtype == "bfloat16" and shared.colocated
    apart = weight_sync.build(Recipe(rollout=RolloutConfig(num_gpus_per_engine=1), train=TrainConfig(
        num_gpus_per_trainer=1)))
    assert type(apart) is ObjectStore
    assert type(weight_sync.build(Recipe(rollout=RolloutConfig(weight_sync="collective")))) is Collective
    assert set(weight_sync.TRANSPORTS) == {"object_store", "cuda_ipc", "collective"}


class FakeTrainer:
    """What CudaIpc.send reads of a trainer rank."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        self.device, self.expandable, self.weights = torch.device("cuda", 0), False, weights

    def engine_weights(self, *, gather_to_cpu: bool) -> dict[str, torch.Tensor]:
        assert not gather_to_cpu, "CUDA IPC shares the weights from the GPU"
        return self.weights


class FakeEngine:
    """What CudaIpc.receive calls on an engine: keeps copies of what it was given."""

    def load_weights_in_process(self, named: dict[str, torch.Tensor]) -> int:
        self.loaded = {name: (t.device.type, t.clone().cpu()) for name, t in named.items()}
        return len(named)


def _engine_process(transport: CudaIpc, payload, queue) -> None:
    """Another process on the GPU: map the trainer's buffers and load them."""
    engine = FakeEngine()
    gpu = transport.connect_engine(engine)
    count = transport.receive(engine, payload)
    queue.put((gpu, count, engine.loaded))


@pytest.mark.gpu  # CUDA IPC
def test_cuda_ipc_engine_loads_views_of_the_trainers_buffers():
    import torch.multiprocessing as mp

    weights = {"a.weight": torch.randn(3, 5, device="cuda"), "b.bias": torch.randn(7, device="cuda"),
               "steps": torch.arange(4, device="cuda")}  # a non-floating tensor keeps its dtype, in its own buffer
    trainer, transport = FakeTrainer(weights), CudaIpc("bfloat16")
    trainer_gpu = transport.connect_trainer(trainer)
    payload = transport.send(trainer)
    assert len(payload) == 2 and len(transport.buffers) == 2  # one buffer per dtype: bf16 and int64
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_engine_process, args=(CudaIpc("bfloat16"), payload, queue))  # its own copy
    child.start()
    engine_gpu, count, loaded = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and engine_gpu == trainer_gpu and count == 3
    for name, want in weights.items():
        device, got = loaded[name]
        cast = want.to(torch.bfloat16) if want.is_floating_point() else want
        assert device == "cuda" and got.dtype == cast.dtype and torch.equal(got, cast.cpu()), name
    transport.release(trainer)
    assert transport.buffers == []
