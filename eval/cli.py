"""`sse-rl eval`: evaluate a checkpoint on AIME24/AIME25/MATH-500, or compare finished runs.

    sse-rl eval --model DIR [--benchmarks aime24,aime25] [--samples 64] [--out DIR] [--resume] ...
    sse-rl eval --compare RUN1 RUN2 ... [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, get_args, get_type_hints

from sse_rl.config import DEFAULT_BENCHMARKS, EvalRecipe, RecipeError, build_recipe, validate


def build_parser() -> argparse.ArgumentParser:
    """The flags, one per `EvalRecipe` field; unset flags keep the recipe's defaults (shown by --help)."""
    d = EvalRecipe()
    p = argparse.ArgumentParser(prog="sse-rl eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub id (any model vLLM supports, SSE-H via the plugin)")
    p.add_argument("--benchmarks", help=f"comma-separated benchmark names (default: {','.join(DEFAULT_BENCHMARKS)}; "
                                        "with --data-file: the files' stems)")
    p.add_argument("--data-file", nargs="+", default=[], metavar="FILE",
                   help="local .jsonl/.parquet problem files (fields problem, answer, optional id), one per benchmark")
    p.add_argument("--problem-column", default=d.problem_column,
                   help="the data files' problem column or dotted path: text, or chat messages used as the prompt")
    p.add_argument("--answer-column", default=d.answer_column,
                   help="the data files' answer column or dotted path, e.g. reward_model.ground_truth")
    p.add_argument("--samples", type=int, default=d.samples, help="samples per problem (n)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 disables top-k")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="generation budget per sample")
    p.add_argument("--seed", type=int, default=d.seed, help="run seed; every sample's seed derives from it")
    p.add_argument("--instruction", default=d.instruction, help="appended to every text problem")
    p.add_argument("--system-prompt", default=d.system_prompt, help="system turn before every prompt")
    p.add_argument("--out", default=d.out, help="run folder (default runs/eval/<model folder name>); "
                                                "with --compare: where compare.md/.png go")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished samples")
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--state-dtype", choices=field_choices("state_dtype"), default=d.state_dtype,
                   help="the SSE state cache's dtype (vLLM's mamba_ssm_cache_dtype): auto = float32; bfloat16 halves "
                        "the state bytes a decode step moves")
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    p.add_argument("--data-parallel", type=int, default=d.data_parallel,
                   help="number of engines (Ray actors); 0: one per tensor-parallel group of visible GPUs")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile in vLLM")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare finished run folders instead of evaluating")
    return p


def field_choices(name: str) -> tuple[str, ...]:
    """The values the `EvalRecipe` field `name` (a Literal) takes: its flag's choices come from the schema, so a bad
    value is refused by argparse under the flag's name before anything starts."""
    return get_args(get_type_hints(EvalRecipe)[name])


def recipe_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as `EvalRecipe` fields (built and checked by `config.build_recipe` / `config.validate`)."""
    return {
        "model": args.model or "", "data_files": list(args.data_file), "samples": args.samples,
        "benchmarks": [b.strip() for b in args.benchmarks.split(",")] if args.benchmarks else [],
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "max_tokens": args.max_tokens,
        "seed": args.seed, "instruction": args.instruction, "system_prompt": args.system_prompt,
        "problem_column": args.problem_column, "answer_column": args.answer_column, "out": args.out,
        "resume": args.resume,
        "dtype": args.dtype, "tensor_parallel_size": args.tensor_parallel_size, "data_parallel": args.data_parallel,
        "state_dtype": args.state_dtype,
        "max_model_len": args.max_model_len, "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.enforce_eager, "progress": not args.no_progress}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        from sse_rl.eval.report import compare

        print(compare(args.compare, args.out or None))
        return 0
    try:
        recipe = validate(*build_recipe(EvalRecipe, recipe_fields(args)))
    except RecipeError as err:
        parser.error(str(err))
    from sse_rl.eval.report import SUMMARY_FILE
    from sse_rl.eval.runner import run_eval

    try:
        run_eval(recipe)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished samples are saved in {recipe.out_dir()}; add --resume to continue",
              file=sys.stderr)
        return 130
    print((recipe.out_dir() / SUMMARY_FILE).read_text(encoding="utf-8"))
    return 0
