"""Generation for evaluation: a vLLM `LLM` in this process, or several of them as Ray actors (one per GPU group).

Every source of completions is a `GenerateFn`: it takes requests and sampling settings and yields
`(request index, Generation)` pairs *as samples finish*, in any order, so the runner can grade and save each one at
once. Choices:
1) A local engine is driven with `add_request` + `step()`, the loop `LLM.generate` itself runs, so finished samples
   come out one by one while the engine stays full; requests left when the consumer stops are aborted, so the engine
   can be reused (the GRPO trainer's engine, a test's engine).
2) Every request is one sample (n=1), so a run can stop and resume at any sample. Sampling randomness follows the
   seeding rule of `sse_rl.config.SamplingConfig`: the engine's seed, no per-request seeds; data-parallel engines get
   seeds seed, seed + 1, ...
3) Data parallelism: requests are dealt round-robin to one actor per engine; each actor streams its results back
   through a Ray streaming generator and the driver merges the streams with `ray.wait`.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sse_rl import check_worker_imports
from sse_rl.config import SamplingConfig

# Each engine call gets fresh request ids, so ids never clash with earlier calls on the same engine.
_call_counter = itertools.count()


def vllm_params(sampling: SamplingConfig) -> Any:
    """vLLM's `SamplingParams` of one eval request: one sample (choice 2; `evaluate` refuses n > 1), no seed of its
    own."""
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                          max_tokens=sampling.max_tokens)


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
    """Yield (index into requests, Generation) from a vLLM `LLM` as each sample finishes."""
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
    """How to build each vLLM engine (the `LLM(...)` arguments this package sets)."""

    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    seed: int = 0

    def build(self) -> Any:
        from vllm import LLM

        return LLM(**asdict(self))


class EngineActor:
    """One vLLM engine in a Ray actor (wrapped with `ray.remote` in `start_actors`, so Ray is only imported there)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.llm = spec.build()

    def ready(self) -> bool:
        return True

    def generate(self, requests: list[GenRequest], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        yield from stream_vllm(self.llm, requests, sampling)


def start_actors(spec: EngineSpec, count: int, gpus_per_engine: float) -> list[Any]:
    """Start `count` engine actors (Ray must be initialised), each holding `gpus_per_engine` GPUs; wait until loaded."""
    import ray

    actor_cls = ray.remote(num_gpus=gpus_per_engine)(EngineActor)
    actors = [actor_cls.remote(dataclasses.replace(spec, seed=spec.seed + rank)) for rank in range(count)]
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
            gen = actor.generate.options(num_returns="streaming").remote([requests[i] for i in shard], sampling)
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
    """The engines of one eval run: a local `LLM` when data_parallel == 1, else Ray actors. Callable as a GenerateFn."""

    def __init__(self, spec: EngineSpec, data_parallel: int) -> None:
        if data_parallel < 1:
            raise ValueError(f"data_parallel must be >= 1, got {data_parallel}")
        self.spec = spec
        self.llm = spec.build() if data_parallel == 1 else None
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
        if self.llm is not None:
            return stream_vllm(self.llm, requests, sampling)
        return stream_actors(self.actors, requests, sampling)

    def close(self) -> None:
        """Stop the engine processes now rather than at interpreter exit."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
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
