"""Where the controller's actors go: Ray placement groups of identical bundles, packed onto as few nodes as fit.

Two groups are made (`Controller.start_actors`):
- colocated (CUDA IPC weight sync): bundle r = {GPU: 1, CPU: 2} holds trainer rank r and engine r, so the pair
  shares one GPU;
- otherwise the trainer ranks alone, one bundle each ({GPU: train.num_gpus_per_trainer, CPU: 1}). PACK fills a
  node before the next, so FSDP2's collectives stay on NVLink where the ranks fit one node, and the group is
  reserved whole (gang scheduling): no rank starts, and waits in the rendezvous, while another cannot be placed.
A group the cluster cannot hold is an error that names the shortfall, not a hang.
"""
from __future__ import annotations

from typing import Any

import ray

READY_TIMEOUT_S = 300.0  # a feasible group on a busy or autoscaling cluster may take a while


def packed_group(bundle: dict[str, float], count: int, what: str) -> list[dict[str, Any]]:
    """Ray actor options placing actor i in bundle i of one PACK placement group of `count` copies of `bundle`."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {k: v for k, v in bundle.items() if v > 0}
    have = ray.cluster_resources()
    short = [f"{k}: {v * count:g} needed, {have.get(k, 0):g} in the cluster" for k, v in bundle.items()
             if v * count > have.get(k, 0)]
    if short:
        raise RuntimeError(f"{what}: the Ray cluster cannot hold {count} x {bundle} ({'; '.join(short)})")
    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    try:
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"{what}: {count} x {bundle} could not be placed in {READY_TIMEOUT_S:g} s; free now: "
                           f"{ray.available_resources()}") from None
    return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
            for i in range(count)]
