"""Weight sync through Ray's object store: works for any placement and device, the default off a shared GPU.

Every trainer rank enters the weight gather (a collective under fsdp2); rank 0 puts one full HF-named CPU state dict,
cast to the engines' dtype (half the bytes of fp32 for bf16 engines), into the object store once, and every engine
resolves that same object and loads it in place through a safetensors file in /dev/shm that each of its
tensor-parallel workers reads (`sse_rl.models.vllm.weight_update.update_weights`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray
import torch
from torch import Tensor

from sse_rl.weight_sync.base import WeightTransport

if TYPE_CHECKING:
    from sse_rl.workers.rollout import RolloutWorker
    from sse_rl.workers.trainer import TrainerWorker


class ObjectStore(WeightTransport):
    method = "object_store"

    def transfer(self, trainers: list[Any], engines: list[Any]) -> list[int]:
        states = [t.send_weights.remote() for t in trainers]  # rank 0's is full, the others' are empty
        ray.get(states[1:])
        return ray.get([engine.receive_weights.remote(states[0]) for engine in engines])

    def send(self, trainer: TrainerWorker) -> dict[str, Tensor]:
        """Rank 0: the full weights on the CPU in the engines' dtype; other ranks: {} after the gather."""
        cast = getattr(torch, self.dtype)
        return {name: t.to(dtype=cast if t.is_floating_point() else t.dtype, copy=True)
                for name, t in trainer.engine_weights(gather_to_cpu=True).items()}

    def receive(self, engine: RolloutWorker, payload: dict[str, Tensor]) -> int:
        return engine.load_weights(payload)
