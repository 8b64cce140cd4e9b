"""Evaluation of checkpoints on AIME24 / AIME25 / MATH-500: vLLM sampling, math grading, pass@k / maj@k, reports.

`sse-rl eval` runs `run_eval` on an `sse_rl.config.EvalRecipe`; the GRPO trainer calls `evaluate` with its own
engine. Sampling settings are `sse_rl.config.SamplingConfig` (exported here too: the type of every `GenerateFn`).
Heavy imports (vLLM, Ray, matplotlib, datasets) happen only inside the functions that need them.
"""
from sse_rl.config import SamplingConfig
from sse_rl.eval.benchmarks import BENCHMARKS, Problem, load_benchmark, load_problems_file, normalize_answer
from sse_rl.eval.engines import GenerateFn, Generation, GenRequest
from sse_rl.eval.grading import Grade, Grader, MathGrader, RewardGrader, ScoreFn, extract_answer
from sse_rl.eval.metrics import BenchmarkMetrics, ProblemSamples, compute_metrics, majority_vote, pass_at_k
from sse_rl.eval.report import compare, load_results
from sse_rl.eval.runner import evaluate, run_eval

__all__ = [
    "BENCHMARKS",
    "BenchmarkMetrics",
    "GenRequest",
    "GenerateFn",
    "Generation",
    "Grade",
    "Grader",
    "MathGrader",
    "Problem",
    "ProblemSamples",
    "RewardGrader",
    "SamplingConfig",
    "ScoreFn",
    "compare",
    "compute_metrics",
    "evaluate",
    "extract_answer",
    "load_benchmark",
    "load_problems_file",
    "load_results",
    "majority_vote",
    "normalize_answer",
    "pass_at_k",
    "run_eval",
]
