"""The eval run (`sse-rl eval`): its schema, filled from the command's flags, the constraints between them, and the
files of an eval run folder.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path

from sse_rl.config.grpo import RolloutConfig
from sse_rl.config.reading import bounded
from sse_rl.config.sampling import SamplingConfig

STANDARD_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_BENCHMARKS = ("aime24", "aime25")
# The usual sampling of reasoning-model evals: `sse-rl eval`'s defaults, and `evaluate()`'s when given none.
EVAL_SAMPLING = SamplingConfig(max_tokens=32768, temperature=0.6, top_p=0.95)
EVAL_CONFIG_FILE, COMPLETIONS_FILE = "config.json", "completions.jsonl"  # in an eval run folder
# The engines' SSE state-cache dtypes (vLLM's mamba_ssm_cache_dtype, issue #27): the values a GRPO recipe's
# rollout.state_dtype takes, so eval and training accept one list.
StateDtype = typing.get_type_hints(RolloutConfig)["state_dtype"]
# Settings that change what a sample is; a resumed eval run must keep them.
GENERATION_KEYS = ("model", "temperature", "top_p", "top_k", "max_tokens", "seed", "instruction", "system_prompt")


@dataclass
class EvalRecipe:
    """Everything `sse-rl eval` needs, from its flags (a field per flag: `--top-p` is `top_p`); saved as
    config.json in the run folder."""

    model: str = ""  # checkpoint folder or hub id
    benchmarks: list[str] = field(default_factory=list)  # [] = DEFAULT_BENCHMARKS, or the data files' stems
    data_files: list[str] = field(default_factory=list)  # local jsonl/parquet files, one per benchmark
    # the data files' columns (dotted paths into nested ones: reward_model.ground_truth); a problem is text or a list
    # of chat messages (the whole prompt, as written: the instruction is not appended)
    problem_column: str = "problem"
    answer_column: str = "answer"
    samples: int = bounded(64, ge=1)
    temperature: float = bounded(EVAL_SAMPLING.temperature, ge=0)  # 0 = greedy
    top_p: float = bounded(EVAL_SAMPLING.top_p, gt=0, le=1)
    top_k: int = bounded(EVAL_SAMPLING.top_k, ge=0)  # 0 = no top-k cut
    max_tokens: int = bounded(EVAL_SAMPLING.max_tokens, ge=1)
    seed: int = 0  # engine r of the data-parallel engines samples from seed + r
    instruction: str = STANDARD_INSTRUCTION  # appended to every text problem
    system_prompt: str = ""  # the system turn before every prompt (needs the tokenizer's chat template)
    out: str = ""  # "" = runs/eval/<model folder name>
    resume: bool = False
    dtype: str = "auto"
    state_dtype: StateDtype = "auto"  # the SSE state cache's dtype: auto = float32, bfloat16 halves its bytes
    tensor_parallel_size: int = bounded(1, ge=1)
    data_parallel: int = bounded(0, ge=0)  # engines; 0 = one per tensor_parallel_size visible GPUs (one on CPU)
    max_model_len: int | None = bounded(None, ge=2)
    gpu_memory_utilization: float = bounded(0.9, gt=0, le=1)
    enforce_eager: bool = False
    progress: bool = True

    def sources(self) -> list[tuple[str, str | None]]:
        """(benchmark name, data file or None for the hub) pairs."""
        if self.data_files:
            names = self.benchmarks or [Path(f).stem for f in self.data_files]
            return list(zip(names, self.data_files))
        return [(name, None) for name in self.benchmarks or DEFAULT_BENCHMARKS]

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "eval" / Path(self.model.rstrip("/")).name


def eval_rules(recipe: EvalRecipe) -> list[str]:
    """The constraints between `sse-rl eval`'s flags."""
    errors = [] if recipe.model else ["model: required (a checkpoint folder or hub id: --model DIR), or compare "
                                      "finished runs with --compare RUN1 RUN2 ..."]
    if recipe.benchmarks and recipe.data_files and len(recipe.benchmarks) != len(recipe.data_files):
        errors.append(f"benchmarks: {len(recipe.benchmarks)} names for {len(recipe.data_files)} data_files; give "
                      "one name per file, or leave out --benchmarks")
    names = [name for name, _ in recipe.sources()]
    if len(set(names)) != len(names):
        errors.append(f"benchmarks: names must be distinct, got {names}")
    return errors
