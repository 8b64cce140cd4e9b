"""Weight sync over CUDA IPC: engine r maps the GPU buffers of trainer rank r, which shares its GPU.

Choices:
1) Placement: engine r and trainer rank r share bundle r of one placement group (`colocated`), and `connect` checks
   that they really see the same physical GPU.
2) Every rank gathers the full weights on its GPU and packs them into one flat buffer per dtype (`flat.pack`), cast
   to the engines' dtype; its engine maps those buffers and loads from views of them: no copy through the host, no
   serialisation.
3) The buffers are allocated from plain segments even where the trainer uses expandable ones (`cuda_alloc`): torch
   shares plain segments by cudaIpc handles, expandable ones by passing file descriptors between processes, which
   needs ptrace rights that containers often deny.
4) A rank keeps its buffers until every engine is done (`release`), then gives the memory back, so a woken engine
   finds it free.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import torch
from torch import Tensor

from sse_rl.weight_sync import flat
from sse_rl.weight_sync.base import WeightTransport
from sse_rl.workers import cuda_alloc

if TYPE_CHECKING:
    from sse_rl.workers.rollout import RolloutWorker
    from sse_rl.workers.trainer import TrainerWorker


@dataclass
class SharedBuffer:
    """One flat GPU buffer shared over CUDA IPC: `handle` is torch's `reduce_tensor` of it (rebuild fn, args);
    `entries` are the tensors packed in it."""

    handle: tuple
    entries: flat.Entries


class CudaIpc(WeightTransport):
    method = "cuda_ipc"
    colocated = True

    def connect(self, trainers: list[Any], engines: list[Any]) -> None:
        trainer_gpus = ray.get([t.connect_weights.remote(self) for t in trainers])
        engine_gpus = ray.get([e.connect_weights.remote(self) for e in engines])
        if engine_gpus != trainer_gpus:
            raise RuntimeError(f"rollout.weight_sync=cuda_ipc: engine r must share trainer rank r's GPU, got engine "
                               f"GPUs {engine_gpus} and trainer GPUs {trainer_gpus}")

    def transfer(self, trainers: list[Any], engines: list[Any]) -> list[int]:
        shared = [t.send_weights.remote() for t in trainers]  # every rank: its full copy on its GPU
        written = ray.get([engine.receive_weights.remote(s) for engine, s in zip(engines, shared)])
        ray.get([t.release_weights.remote() for t in trainers])
        return written

    def connect_trainer(self, trainer: TrainerWorker, *args: Any) -> str:
        self.buffers: list[Tensor] = []
        return _gpu_uuid(trainer.device)

    def connect_engine(self, engine: RolloutWorker, *args: Any) -> str:
        return _gpu_uuid(torch.device("cuda", torch.cuda.current_device()))

    @torch.no_grad()
    def send(self, trainer: TrainerWorker) -> list[SharedBuffer]:
        from torch.multiprocessing.reductions import reduce_tensor

        state = trainer.engine_weights(gather_to_cpu=False)
        with cuda_alloc.plain_segments(trainer.expandable):
            packed = flat.pack(state, getattr(torch, self.dtype), trainer.device)
        self.buffers = [buffer for buffer, _ in packed]
        torch.cuda.synchronize(trainer.device)  # the engine reads on its own stream
        return [SharedBuffer(reduce_tensor(buffer), entries) for buffer, entries in packed]

    def receive(self, engine: RolloutWorker, payload: list[SharedBuffer]) -> int:
        """Load from views of the mapped buffers; the mappings are dropped before returning, so the trainer rank may
        free the memory."""
        device = torch.cuda.current_device()
        named = {}
        for shared in payload:
            named.update(flat.unpack(_map(shared.handle, device), shared.entries))
        count = engine.load_weights_in_process(named)
        del named
        torch.cuda.synchronize(device)
        return count

    def release(self, trainer: TrainerWorker) -> None:
        self.buffers = []
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def _gpu_uuid(device: torch.device) -> str:
    """Which physical GPU a process uses: device indices differ between processes, UUIDs do not."""
    return str(torch.cuda.get_device_properties(device).uuid)


def _map(handle: tuple, device: int) -> Tensor:
    """A trainer rank's buffer in this process: `reduce_tensor`'s rebuild call, with this process's index of the GPU
    in place of the trainer's (each process numbers only the GPUs it sees)."""
    rebuild, args = handle
    call = inspect.signature(rebuild).bind(*args)
    call.arguments["storage_device"] = device
    return rebuild(*call.args, **call.kwargs)
