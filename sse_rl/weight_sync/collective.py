"""Weight sync by broadcast: trainer rank 0 sends flat buffers to every engine over a process group of their own.

For engines on other devices or nodes than the trainers (disaggregated): NCCL between GPUs, gloo between CPUs
(engines and trainers on the same kind of device, which the recipe check enforces). The group (trainer rank 0 as
rank 0, engine i as rank i + 1) is separate from the trainers' default group and from vLLM's own, and is built once
at `connect`, where rank 0 also reports how it packs the weights (`flat.layout`), so that each engine can allocate
its receive buffers every sync without asking.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ray
import torch

from sse_rl.weight_sync import flat
from sse_rl.weight_sync.base import WeightTransport

if TYPE_CHECKING:
    from sse_rl.workers.rollout import RolloutWorker
    from sse_rl.workers.trainer import TrainerWorker


class Collective(WeightTransport):
    method = "collective"

    def connect(self, trainers: list[Any], engines: list[Any]) -> None:
        meet = ray.get(trainers[0].address.remote())  # (host, port, secret): `TrainerWorker.address`
        world = len(engines) + 1
        layouts = [t.connect_weights.remote(self, *meet, world) for t in trainers]
        ray.get([e.connect_weights.remote(self, *meet, i + 1, world) for i, e in enumerate(engines)])
        self.layout: flat.Layout = ray.get(layouts)[0]

    def transfer(self, trainers: list[Any], engines: list[Any]) -> list[int]:
        sends = [t.send_weights.remote() for t in trainers]
        written = ray.get([engine.receive_weights.remote(self.layout) for engine in engines])
        ray.get(sends)
        return written

    def connect_trainer(self, trainer: TrainerWorker, host: str, port: int, secret: str,
                        world_size: int) -> flat.Layout | None:
        """Rank 0 hosts the group and returns its packing (shapes only: no gather); the other ranks only send."""
        self.group = None
        if trainer.rank != 0:
            return None
        self.group = flat.join_group(host, port, 0, world_size, trainer.device, secret)
        return flat.layout(trainer.engine_weight_shapes(), getattr(torch, self.dtype))

    def connect_engine(self, engine: RolloutWorker, host: str, port: int, secret: str, rank: int,
                       world_size: int) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.group = flat.join_group(host, port, rank, world_size, self.device, secret)

    @torch.no_grad()
    def send(self, trainer: TrainerWorker) -> None:
        """Every rank enters the gather (a collective under fsdp2); rank 0 broadcasts the packed buffers."""
        state = trainer.engine_weights(gather_to_cpu=False)
        if self.group is not None:
            for buffer, _ in flat.pack(state, getattr(torch, self.dtype), trainer.device):
                self.group.broadcast(buffer, 0).wait()

    def receive(self, engine: RolloutWorker, payload: flat.Layout) -> int:
        named = {}
        for dtype, entries, total in payload:
            buffer = torch.empty(total, dtype=dtype, device=self.device)  # [P]
            self.group.broadcast(buffer, 0).wait()
            named.update(flat.unpack(buffer, entries))
        return engine.load_weights_in_process(named)
