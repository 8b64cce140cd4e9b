"""Trainer -> engines: new weights after every update, then a probe that checks the engines really use them.

One module per transport, each owning its placement needs, its connection, the trainer's send and the engine's
receive (`base.WeightTransport` says what a transport is):
- `object_store` (any placement, the default off a shared GPU): rank 0's full CPU state dict through Ray;
- `cuda_ipc` (engine r on trainer rank r's GPU): engines map the trainers' GPU buffers, no host copy;
- `collective` (engines elsewhere): trainer rank 0 broadcasts flat buffers over a process group of their own.
A new transport is a module with a `WeightTransport` subclass, registered in `TRANSPORTS`.
`probe` compares engine and trainer logprobs after a sync.
"""
from __future__ import annotations

from sse_rl.config import Recipe, resolve_sync_method
from sse_rl.weight_sync.base import WeightTransport
from sse_rl.weight_sync.collective import Collective
from sse_rl.weight_sync.cuda_ipc import CudaIpc
from sse_rl.weight_sync.object_store import ObjectStore
from sse_rl.weight_sync.probe import check, probe

TRANSPORTS: dict[str, type[WeightTransport]] = {cls.method: cls for cls in (ObjectStore, CudaIpc, Collective)}

__all__ = ["TRANSPORTS", "WeightTransport", "build", "check", "probe"]


def build(recipe: Recipe) -> WeightTransport:
    """The transport of a run: rollout.weight_sync, with "auto" resolved by the recipe's placement."""
    method = resolve_sync_method(recipe)
    assert method in TRANSPORTS, f"rollout.weight_sync {method!r} passed the recipe check but has no transport"
    return TRANSPORTS[method](recipe.rollout.dtype)
