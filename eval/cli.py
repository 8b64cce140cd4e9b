"""`sse-rl eval`: evaluate a checkpoint on AIME24/AIME25/MATH-500, or compare finished runs.

    sse-rl eval --model DIR [--benchmarks aime24,aime25] [--samples 64] [--out DIR] [--resume] ...
    sse-rl eval --compare RUN1 RUN2 ... [--out DIR]
"""
from __future__ import annotations

import argparse
import sys

from sse_rl.eval.runner import DEFAULT_BENCHMARKS, STANDARD_INSTRUCTION, EvalConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sse-rl eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="checkpoint folder or hub id (any model vLLM supports, SSE-H via the plugin)")
    p.add_argument("--benchmarks", help=f"comma-separated benchmark names (default: {','.join(DEFAULT_BENCHMARKS)}; "
                                        "with --data-file: the files' stems)")
    p.add_argument("--data-file", nargs="+", default=[], metavar="FILE",
                   help="local .jsonl/.parquet problem files (fields problem, answer, optional id), one per benchmark")
    p.add_argument("--samples", type=int, default=64, help="samples per problem (n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--max-tokens", type=int, default=32768, help="generation budget per sample")
    p.add_argument("--seed", type=int, default=0, help="run seed; every sample's seed derives from it")
    p.add_argument("--instruction", default=STANDARD_INSTRUCTION, help="appended to every problem")
    p.add_argument("--out", default="", help="run folder (default runs/eval/<model folder name>); "
                                             "with --compare: where compare.md/.png go")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished samples")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--data-parallel", type=int, default=0,
                   help="number of engines (Ray actors); 0: one per tensor-parallel group of visible GPUs")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile in vLLM")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="compare finished run folders instead of evaluating")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(
        model=args.model, benchmarks=tuple(b.strip() for b in args.benchmarks.split(",")) if args.benchmarks else (),
        data_files=tuple(args.data_file), samples=args.samples, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed, instruction=args.instruction, out=args.out,
        resume=args.resume, dtype=args.dtype, tensor_parallel_size=args.tensor_parallel_size,
        data_parallel=args.data_parallel, max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        from sse_rl.eval.report import compare

        print(compare(args.compare, args.out or None))
        return 0
    if not args.model:
        parser.error("--model is required (or --compare RUN1 RUN2 ...)")
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    from sse_rl.eval.report import SUMMARY_FILE
    from sse_rl.eval.runner import run_eval

    try:
        run_eval(config)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished samples are saved in {config.out_dir()}; add --resume to continue",
              file=sys.stderr)
        return 130
    print((config.out_dir() / SUMMARY_FILE).read_text(encoding="utf-8"))
    return 0
