"""What every weight transport is: `WeightTransport`, the steps of one sync on each side of it.

A transport is one object per run. The controller's copy says where the actors must go (`colocated`), connects them
once (`connect`) and drives every sync (`push`). Each worker gets a copy of its own at `connect` and runs its end of
the transfer there: `send` in every trainer rank (`TrainerWorker.send_weights`), `receive` in every engine
(`RolloutWorker.receive_weights`), then `release` in the trainer ranks once the engines are done. What a process
keeps between syncs (a process group, shared buffers) lives on its own copy.

What the workers give a transport: a trainer rank its `engine_weights` (the HF-named full weights, names as in the
checkpoint), `engine_weight_shapes`, `device`, `rank`, `address()`; an engine its `load_weights` (through a file
every tensor-parallel worker reads) and `load_weights_in_process` (tensors handed over as objects, any device).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import ray

if TYPE_CHECKING:
    from sse_rl.workers.rollout import RolloutWorker
    from sse_rl.workers.trainer import TrainerWorker


class WeightTransport(ABC):
    """How the trainer ranks' weights reach the engines after each update; one subclass per transport."""

    method: ClassVar[str]  # the recipe's rollout.weight_sync value that selects it
    # engine r and trainer rank r must share a GPU: they are placed in bundle r of one placement group
    colocated: ClassVar[bool] = False

    def __init__(self, dtype: str):
        self.dtype = dtype  # the engines' dtype: floating weights are cast to it before they travel

    # ------------------------------------------------------------------------------------------------------------
    # The controller's side

    def connect(self, trainers: list[Any], engines: list[Any]) -> None:
        """Once, after the actors started: give every worker its copy of this transport."""
        ray.get([w.connect_weights.remote(self) for w in [*trainers, *engines]])

    def push(self, trainers: list[Any], engines: list[Any]) -> float:
        """One sync: every engine loads the trainers' current weights; returns the seconds it took.

        Every engine must have written every one of its parameters: a tensor silently skipped would leave it
        sampling from stale weights.
        """
        start = time.perf_counter()
        written = self.transfer(trainers, engines)
        expected = ray.get([engine.num_parameters.remote() for engine in engines])
        for i, (got, want) in enumerate(zip(written, expected)):
            if got != want:
                raise RuntimeError(f"weight sync: engine {i} updated {got} of its {want} parameters; "
                                   "the trainer's names do not cover the engine model")
        return time.perf_counter() - start

    @abstractmethod
    def transfer(self, trainers: list[Any], engines: list[Any]) -> list[int]:
        """The remote calls of one sync; returns how many parameters each engine wrote."""

    # ------------------------------------------------------------------------------------------------------------
    # The workers' side (each on its own copy)

    def connect_trainer(self, trainer: TrainerWorker, *args: Any) -> Any:
        """In every trainer rank, at `connect`."""
        return None

    def connect_engine(self, engine: RolloutWorker, *args: Any) -> Any:
        """In every engine, at `connect`."""
        return None

    @abstractmethod
    def send(self, trainer: TrainerWorker) -> Any:
        """In every trainer rank, every sync (under fsdp2 each rank must enter the weight gather)."""

    @abstractmethod
    def receive(self, engine: RolloutWorker, payload: Any) -> int:
        """In every engine, every sync: load the new weights; returns how many parameters were written."""

    def release(self, trainer: TrainerWorker) -> None:
        """In every trainer rank, once every engine has received what it sent (a transport that keeps nothing
        between `send` and the engines' `receive` has nothing to let go of)."""
        return None
