"""Trainer -> engines: new weights after every update, then a probe that checks the engines really use them.

Choices:
1) object_store (CPU, and any placement): every trainer rank enters the gather (a collective under fsdp2), rank 0
   puts one full HF-named state dict, every engine resolves that same object and loads it in place (the plugin's
   `load_weights`, no restart).
   cuda_ipc (engine r on the GPU of trainer rank r): each rank packs the full weights into GPU buffers and hands
   IPC handles to its engine, which loads from views of the mapped memory: no host round trip, no serialisation.
   The ranks keep the buffers until every engine is done (`release_shared_weights`).
   collective (engines on other devices or nodes): trainer rank 0 broadcasts the same flat buffers to all engines
   over a process group of their own (NCCL on GPU, gloo on CPU), set up once by `connect`.
2) "Every parameter mapped": each engine reports how many of its own parameters the update wrote; anything short of
   all of them fails the run (a silently skipped tensor would leave the engine on stale weights).
3) The probe: first-token top-k logprobs of a fixed probe batch, engine vs trainer, max |difference| is logged
   every step and compared with `run.probe_tolerance`.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import ray

logger = logging.getLogger(__name__)


def push(trainers: list[Any], engines: list[Any], dtype: str, method: str = "object_store") -> float:
    """Copy the full weights (cast to the engines' `dtype`) into every engine; returns the seconds it took.

    method: "object_store"; "cuda_ipc" with engine r on the same GPU as trainer rank r (one engine per rank);
    "collective" once `connect` has built the broadcast group."""
    start = time.perf_counter()
    if method == "collective":
        layout = ray.get(trainers[0].weight_layout.remote(dtype))
        sends = [t.broadcast_weights.remote(dtype) for t in trainers]
        written = ray.get([engine.receive_weights.remote(layout) for engine in engines])
        ray.get(sends)
    elif method == "cuda_ipc":
        handles = [t.share_weights.remote(dtype) for t in trainers]  # every rank: its full copy on its GPU
        written = ray.get([engine.update_weights_ipc.remote(h) for engine, h in zip(engines, handles)])
        ray.get([t.release_shared_weights.remote() for t in trainers])
    else:
        states = [t.named_tensors.remote(dtype) for t in trainers]  # rank 0's is full, the others' are empty
        state = states[0]  # stays in the object store; engines fetch it directly
        ray.get(states[1:])
        written = ray.get([engine.update_weights.remote(state) for engine in engines])
    expected = ray.get([engine.num_parameters.remote() for engine in engines])
    for i, (got, want) in enumerate(zip(written, expected)):
        if got != want:
            raise RuntimeError(f"weight sync: engine {i} updated {got} of its {want} parameters; "
                               "the trainer's names do not cover the engine model")
    return time.perf_counter() - start


def connect(trainers: list[Any], engines: list[Any]) -> None:
    """The collective method's process group: trainer rank 0 (rank 0, hosts the store) and engine i (rank i + 1)."""
    host, port = ray.get(trainers[0].address.remote())
    world = len(engines) + 1
    ray.get([trainers[0].join_weight_group.remote(host, port, world)]
            + [e.join_weight_group.remote(host, port, i + 1, world) for i, e in enumerate(engines)])


def probe(trainers: list[Any], engine: Any, prompt_ids: list[list[int]], top_k: int = 5) -> float:
    """Max |engine - trainer| first-token logprob over the probe prompts and the engine's top-k tokens (every rank
    runs the forward, a collective under fsdp2; rank 0's answer is compared)."""
    engine_lps = ray.get(engine.first_token_logprobs.remote(prompt_ids, top_k))
    tokens = [list(lps) for lps in engine_lps]
    trainer_lps = ray.get([t.first_token_logprobs.remote(prompt_ids, tokens) for t in trainers])[0]
    return max(abs(e[t] - lp) for e, toks, tr in zip(engine_lps, tokens, trainer_lps) for t, lp in zip(toks, tr))


def check(diff: float, tolerance: float, step: int) -> None:
    if diff > tolerance:
        logger.warning("step %d: engine and trainer first-token logprobs differ by %.2e (> %.1e): rollouts do not "
                       "come from the trained policy", step, diff, tolerance)
