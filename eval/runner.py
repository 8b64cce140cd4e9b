"""Run an evaluation: prompts -> samples (vLLM) -> grades -> completions file -> metrics -> report.

Two entry points share one loop (`generate_and_grade`):
- `evaluate(...)`: one problem set with an engine you already have (a vLLM `LLM`, or any `GenerateFn`, e.g. the GRPO
  trainer's rollout workers) -> `BenchmarkMetrics`. Optional out_dir for the files.
- `run_eval(config)`: the `sse-rl eval` command: several benchmarks, engines built here (data-parallel Ray actors when
  several GPUs are visible), `--resume`, and the full report.

Choices:
1) Prompt: problem + "\\n" + the standard instruction, wrapped in the tokenizer's chat template when it has one.
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

from sse_rl.eval.benchmarks import Problem, load_benchmark
from sse_rl.eval.engines import (
    Engines,
    EngineSpec,
    GenerateFn,
    Generation,
    GenRequest,
    SamplingConfig,
    default_data_parallel,
    stream_vllm,
)
from sse_rl.eval.grading import Grader, MathGrader
from sse_rl.eval.metrics import BenchmarkMetrics, ProblemSamples, compute_metrics
from sse_rl.eval.report import write_report
from sse_rl.eval.store import CompletionStore, SampleRecord

STANDARD_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
COMPLETIONS_FILE = "completions.jsonl"
CONFIG_FILE = "config.json"
# Settings that change what a sample is; a resumed run must keep them.
GENERATION_KEYS = ("model", "temperature", "top_p", "top_k", "max_tokens", "seed", "instruction")


def build_prompt(problem: str, tokenizer: Any, instruction: str, chat_template: bool = True) -> tuple[str, list[int]]:
    """(prompt text, prompt token ids): the problem plus the instruction, in the chat template when there is one."""
    content = f"{problem}\n{instruction}" if instruction else problem
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        # the template already wrote the special tokens (BOS, role markers)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]
    return content, tokenizer(content)["input_ids"]


@dataclass(frozen=True)
class Job:
    benchmark: str
    problem: Problem
    sample: int
    request: GenRequest


def make_jobs(benchmark: str, problems: list[Problem], samples: int, tokenizer: Any, instruction: str,
              chat_template: bool, store: CompletionStore) -> list[Job]:
    """One job per (problem, sample) not yet in the store, sample-major so early problems are not favoured."""
    prompts = {p.id: build_prompt(p.problem, tokenizer, instruction, chat_template) for p in problems}
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
    sampling = SamplingConfig() if sampling is None else sampling
    out = Path(out_dir) if out_dir is not None else None
    store = CompletionStore(out / COMPLETIONS_FILE if out else None, resume=resume)
    jobs = make_jobs(benchmark, problems, samples, tokenizer, instruction, chat_template, store)
    with MathGrader() if grader is None else contextlib.nullcontext(grader) as active_grader:
        generate_and_grade(generate, jobs, sampling, active_grader, store, progress)
    graded = collect(store, benchmark, problems, samples)
    metrics = compute_metrics(graded)
    if out is not None:
        config = {**asdict(sampling), "samples": samples, "instruction": instruction}
        write_report(out, getattr(tokenizer, "name_or_path", "") or "", config, {benchmark: (metrics, graded)})
    return metrics


DEFAULT_BENCHMARKS = ("aime24", "aime25")


@dataclass(frozen=True)
class EvalConfig:
    """Everything `sse-rl eval` needs; saved as config.json in the run folder."""

    model: str
    benchmarks: tuple[str, ...] = ()  # () -> DEFAULT_BENCHMARKS, or the data files' stems
    data_files: tuple[str, ...] = ()  # local jsonl/parquet files, one per benchmark
    samples: int = 64
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    max_tokens: int = 32768
    seed: int = 0
    instruction: str = STANDARD_INSTRUCTION
    out: str = ""  # "" -> runs/eval/<model folder name>
    resume: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    data_parallel: int = 0  # engines; 0 -> one per tensor_parallel_size visible GPUs (one on CPU)
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {self.samples}")
        if self.benchmarks and self.data_files and len(self.benchmarks) != len(self.data_files):
            raise ValueError(f"--benchmarks names {len(self.benchmarks)} benchmarks but --data-file gives "
                             f"{len(self.data_files)} files; give one name per file, or leave out --benchmarks")
        names = [name for name, _ in self.sources()]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmark names must be distinct, got {names}")
        SamplingConfig(self.temperature, self.top_p, self.top_k, self.max_tokens)

    def sources(self) -> list[tuple[str, str | None]]:
        """(benchmark name, data file or None for the hub) pairs."""
        if self.data_files:
            names = self.benchmarks or tuple(Path(f).stem for f in self.data_files)
            return list(zip(names, self.data_files))
        return [(name, None) for name in self.benchmarks or DEFAULT_BENCHMARKS]

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.top_k, self.max_tokens)

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(model=self.model, dtype=self.dtype, tensor_parallel_size=self.tensor_parallel_size,
                          max_model_len=self.max_model_len, gpu_memory_utilization=self.gpu_memory_utilization,
                          enforce_eager=self.enforce_eager, seed=self.seed)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "eval" / Path(self.model.rstrip("/")).name


def check_run_config(out: Path, config: EvalConfig) -> None:
    """Write config.json; on --resume first check that nothing that changes the samples has changed."""
    path = out / CONFIG_FILE
    current = asdict(config)
    if config.resume and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in GENERATION_KEYS if saved.get(k) != current[k]]
        if changed:
            raise ValueError(f"cannot resume {out}: generation settings differ from the saved run "
                             f"({'; '.join(changed)});"
                             f" use the same settings or another --out")
    path.write_text(json.dumps(current, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def run_eval(config: EvalConfig, generate: GenerateFn | None = None) -> dict:
    """The `sse-rl eval` run: every benchmark, resumable; returns the results dict also written to results.json.

    `generate` replaces the engines this function would build (e.g. an engine shared by several runs).
    """
    from transformers import AutoTokenizer

    out = config.out_dir()
    store = CompletionStore(out / COMPLETIONS_FILE, resume=config.resume)
    check_run_config(out, config)
    problem_sets = {name: load_benchmark(name, data_file) for name, data_file in config.sources()}
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    jobs = [job for name, problems in problem_sets.items()
            for job in make_jobs(name, problems, config.samples, tokenizer, config.instruction, True, store)]
    engines = None
    if jobs and generate is None:
        dp = config.data_parallel or default_data_parallel(config.tensor_parallel_size)
        engines = generate = Engines(config.engine_spec(), dp)
    try:
        if jobs:
            with MathGrader() as grader:
                generate_and_grade(generate, jobs, config.sampling(), grader, store, config.progress)
    finally:
        if engines is not None:
            engines.close()
    reports = {}
    for name, problems in problem_sets.items():
        graded = collect(store, name, problems, config.samples)
        reports[name] = (compute_metrics(graded), graded)
    return write_report(out, config.model, asdict(config), reports)
