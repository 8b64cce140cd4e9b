"""Run an evaluation: prompts -> samples (vLLM) -> grades -> completions file -> metrics -> report.

Two entry points share one loop (`generate_and_grade`):
- `evaluate(...)`: one problem set with an engine you already have (a vLLM `LLM`, or any `GenerateFn`, e.g. the GRPO
  trainer's rollout workers) -> `BenchmarkMetrics`. Optional out_dir for the files.
- `run_eval(config)`: the `sse-rl eval` command: several benchmarks, engines built here (data-parallel Ray actors when
  several GPUs are visible), `--resume`, and the full report.

Choices:
1) Prompt: problem + "\\n" + the standard instruction, wrapped in the tokenizer's chat template when it has one
   (after the system prompt, if any); a problem that is chat messages is the whole prompt, through the chat template
   as written (after the system prompt when it has no system turn of its own).
2) Each sample is graded and appended to completions.jsonl as soon as it finishes; nothing else is state, so a kill
   loses only samples in flight.
"""
from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sse_rl.config import (
    COMPLETIONS_FILE,
    EVAL_CONFIG_FILE,
    EVAL_SAMPLING,
    STANDARD_INSTRUCTION,
    EvalRecipe,
    SamplingConfig,
)
from sse_rl.data import Message, chat_text, row_prompt
from sse_rl.eval.benchmarks import Problem, load_benchmark
from sse_rl.eval.engines import (
    Engines,
    EngineSpec,
    GenerateFn,
    Generation,
    GenRequest,
    default_data_parallel,
    stream_vllm,
)
from sse_rl.eval.grading import Grader, MathGrader
from sse_rl.eval.metrics import BenchmarkMetrics, ProblemSamples, compute_metrics
from sse_rl.eval.report import write_report
from sse_rl.eval.store import CompletionStore, SampleRecord


def build_prompt(problem: str | list[Message], tokenizer: Any, instruction: str, chat_template: bool = True,
                 system_prompt: str = "") -> tuple[str, list[int]]:
    """(prompt text, prompt token ids): chat messages as written, or the problem plus the instruction, in the chat
    template when there is one; `system_prompt` first (it needs the chat template)."""
    if isinstance(problem, str):
        problem = f"{problem}\n{instruction}" if instruction else problem
        if not (chat_template and getattr(tokenizer, "chat_template", None) or system_prompt):
            return problem, tokenizer(problem)["input_ids"]
    messages = row_prompt({"problem": problem}, "{problem}", system_prompt=system_prompt, chat=True,
                          where="eval prompt")
    text = chat_text(tokenizer, messages, "eval prompt")
    # the template already wrote the special tokens (BOS, role markers)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Job:
    benchmark: str
    problem: Problem
    sample: int
    request: GenRequest


def make_jobs(benchmark: str, problems: list[Problem], samples: int, tokenizer: Any, instruction: str,
              chat_template: bool, store: CompletionStore, system_prompt: str = "") -> list[Job]:
    """One job per (problem, sample) not yet in the store, sample-major so early problems are not favoured."""
    prompts = {p.id: build_prompt(p.problem, tokenizer, instruction, chat_template, system_prompt) for p in problems}
    jobs = []
    for sample in range(samples):
        for p in problems:
            if (benchmark, p.id, sample) not in store:
                text, ids = prompts[p.id]
                jobs.append(Job(benchmark, p, sample, GenRequest(f"{benchmark}/{p.id}/{sample}", text, ids)))
    return jobs


def generate_and_grade(generate: GenerateFn, jobs: list[Job], sampling: SamplingConfig, grader: Grader,
                       store: CompletionStore, progress: bool = False) -> None:
    """Run every job, grading and appending each sample to the store the moment it finishes."""
    from tqdm import tqdm

    done = correct = 0
    with tqdm(total=len(jobs), desc="eval", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        stream: Iterator[tuple[int, Generation]] = generate([j.request for j in jobs], sampling)
        try:
            for index, generation in stream:
                job = jobs[index]
                grade = grader([generation.text], [job.problem.answer])[0]
                store.append([SampleRecord(
                    benchmark=job.benchmark, problem_id=job.problem.id, sample=job.sample, gold=job.problem.answer,
                    completion=generation.text, pred=grade.pred, score=grade.score, correct=grade.correct,
                    num_tokens=generation.num_tokens, finish_reason=generation.finish_reason)])
                done, correct = done + 1, correct + grade.correct
                bar.update(1)
                bar.set_postfix(acc=f"{correct / done:.3f}")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


def collect(store: CompletionStore, benchmark: str, problems: list[Problem], samples: int) -> list[ProblemSamples]:
    """The first `samples` graded samples of each problem, in sample order; raises if any is missing."""
    by_key = {(r.problem_id, r.sample): r for r in store.records(benchmark)}
    result = []
    for p in problems:
        missing = [s for s in range(samples) if (p.id, s) not in by_key]
        if missing:
            raise RuntimeError(f"{benchmark} problem {p.id!r}: samples {missing[:5]} were never generated")
        records = [by_key[(p.id, s)] for s in range(samples)]
        result.append(ProblemSamples(
            problem_id=p.id, gold=p.answer, correct=[r.correct for r in records], answers=[r.pred for r in records],
            num_tokens=[r.num_tokens for r in records], truncated=[r.truncated for r in records]))
    return result


def evaluate(generate: Any, problems: list[Problem], *, tokenizer: Any = None, samples: int = 1,
             sampling: SamplingConfig | None = None, grader: Grader | None = None, benchmark: str = "val",
             instruction: str = STANDARD_INSTRUCTION, chat_template: bool = True,
             out_dir: str | Path | None = None, resume: bool = False, progress: bool = False) -> BenchmarkMetrics:
    """Evaluate one problem set with an engine that is already running, e.g. every N GRPO steps.

    Args:
        generate: a vLLM `LLM`, or a `GenerateFn` (requests, sampling) -> iterator of (index, Generation).
        problems: the problem set (`load_benchmark(...)`, or your validation rows as `Problem`s).
        tokenizer: renders and tokenizes prompts; defaults to the `LLM`'s own tokenizer.
        sampling: one sample per request (n=1); defaults to `config.EVAL_SAMPLING` (temperature 0.6, top-p 0.95).
        grader: defaults to a `MathGrader` started (and closed) for this call; pass one to reuse its workers.
        instruction: appended to every problem ("" for none); chat_template: use the tokenizer's chat template.
        out_dir: when given, completions.jsonl, results.json, summary.md and a PNG are written there.
    """
    if hasattr(generate, "llm_engine"):
        llm = generate
        tokenizer = llm.get_tokenizer() if tokenizer is None else tokenizer
        generate = functools.partial(stream_vllm, llm)
    if tokenizer is None:
        raise ValueError("evaluate needs `tokenizer=` when `generate` is not a vLLM LLM")
    sampling = EVAL_SAMPLING if sampling is None else sampling
    if sampling.n != 1:
        raise ValueError(f"evaluate draws one sample per request (samples= sets how many per problem), got "
                         f"sampling.n={sampling.n}")
    out = Path(out_dir) if out_dir is not None else None
    store = CompletionStore(out / COMPLETIONS_FILE if out else None, resume=resume)
    jobs = make_jobs(benchmark, problems, samples, tokenizer, instruction, chat_template, store)
    with MathGrader() if grader is None else contextlib.nullcontext(grader) as active_grader:
        generate_and_grade(generate, jobs, sampling, active_grader, store, progress)
    graded = collect(store, benchmark, problems, samples)
    metrics = compute_metrics(graded)
    if out is not None:
        config = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
                  "max_tokens": sampling.max_tokens, "samples": samples, "instruction": instruction}
        write_report(out, getattr(tokenizer, "name_or_path", "") or "", config, {benchmark: (metrics, graded)})
    return metrics


def engine_spec(recipe: EvalRecipe) -> EngineSpec:
    return EngineSpec(model=recipe.model, dtype=recipe.dtype, tensor_parallel_size=recipe.tensor_parallel_size,
                      max_model_len=recipe.max_model_len, gpu_memory_utilization=recipe.gpu_memory_utilization,
                      enforce_eager=recipe.enforce_eager, seed=recipe.seed,
                      mamba_ssm_cache_dtype=recipe.state_dtype)


def state_dtype_used(engines: Engines) -> str:
    """The SSE state-cache dtype the engines run with (`Engine.state_dtype`), which can differ from the one asked
    for."""
    if engines.engine is not None:
        return engines.engine.state_dtype()
    import ray

    return ray.get(engines.actors[0].state_dtype.remote())


def run_eval(recipe: EvalRecipe, generate: GenerateFn | None = None) -> dict:
    """The `sse-rl eval` run: every benchmark, resumable; returns the results dict also written to results.json.

    recipe: checked by `config.validate` (the command does it first; the resume rules are among its checks).
    generate: replaces the engines this function would build (e.g. an engine shared by several runs).
    The results' config is the recipe plus `state_dtype_used`: the SSE state dtype the engines this call built ran
    with, None when it built none (`generate` given, or every sample already done).
    """
    from transformers import AutoTokenizer

    out = recipe.out_dir()
    problem_sets = {name: load_benchmark(name, data_file, recipe.problem_column, recipe.answer_column)
                    for name, data_file in recipe.sources()}
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    store = CompletionStore(out / COMPLETIONS_FILE, resume=recipe.resume)
    (out / EVAL_CONFIG_FILE).write_text(json.dumps(asdict(recipe), indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    jobs = [job for name, problems in problem_sets.items()
            for job in make_jobs(name, problems, recipe.samples, tokenizer, recipe.instruction, True, store,
                                 recipe.system_prompt)]
    engines, used = None, None
    if jobs and generate is None:
        dp = recipe.data_parallel or default_data_parallel(recipe.tensor_parallel_size)
        engines = generate = Engines(engine_spec(recipe), dp)
    try:
        if engines is not None:
            used = state_dtype_used(engines)
        if jobs:
            with MathGrader() as grader:
                generate_and_grade(generate, jobs, recipe.sampling(), grader, store, recipe.progress)
    finally:
        if engines is not None:
            engines.close()
    reports = {}
    for name, problems in problem_sets.items():
        graded = collect(store, name, problems, recipe.samples)
        reports[name] = (compute_metrics(graded), graded)
    return write_report(out, recipe.model, {**asdict(recipe), "state_dtype_used": used}, reports)
