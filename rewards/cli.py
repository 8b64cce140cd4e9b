"""`sse-rl rewards`: check the grader against a peer-graded file, or grade one completion by hand.

    sse-rl rewards agreement PEER.jsonl [--min-agree 799]
    sse-rl rewards check --answer 204 'so the answer is \\boxed{204}' [--reward my_rewards.py:brevity]

Both go through `RewardPool`, i.e. the same sandboxed grading that training and evaluation use.
"""
import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

from sse_rl.rewards.pool import RewardPool
from sse_rl.rewards.sandbox import SandboxConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sse-rl rewards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    agree = sub.add_parser("agreement", help="math_accuracy vs a peer grader's verdicts")
    agree.add_argument("data", type=Path, help="jsonl with 'completion', 'gold' (or 'answer') and 'peer_correct'")
    agree.add_argument("--min-agree", type=int, default=0, help="exit 1 when fewer rows agree")
    check = sub.add_parser("check", help="grade one completion with the given rewards")
    check.add_argument("completion", nargs="?", help="the completion text (default: read --file or stdin)")
    check.add_argument("--file", type=Path, help="read the completion from this file")
    check.add_argument("--answer", required=True, help="gold answer (dataset column 'answer')")
    check.add_argument("--reward", action="append", help="reward spec, repeatable (default: math_accuracy, format)")
    for p in (agree, check):
        p.add_argument("--workers", type=int, default=2, help="grading processes")
        p.add_argument("--timeout-s", type=float, default=10.0, help="hard per-sample limit (worker is killed)")
    return parser


def _agreement(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    missing = [k for k in ("completion", "peer_correct") if rows and k not in rows[0]]
    if not rows or missing or not ({"gold", "answer"} & set(rows[0])):
        raise SystemExit(f"{args.data}: need rows with 'completion', 'gold' or 'answer', 'peer_correct'")
    golds = [r.get("gold", r.get("answer")) for r in rows]
    start = time.perf_counter()
    with RewardPool(["math_accuracy"], SandboxConfig(workers=args.workers, timeout_s=args.timeout_s)) as pool:
        result = pool.score([r.get("problem", "") for r in rows], [r["completion"] for r in rows], answer=golds)
    seconds = time.perf_counter() - start
    ours = result.per_function["math_accuracy"]
    disagree = [i for i, r in enumerate(rows) if (ours[i] == 1.0) != bool(r["peer_correct"])]
    for i in disagree:
        print(f"row {i}: gold {golds[i]!r}, peer {rows[i]['peer_correct']}, ours {ours[i]}")
    agreed = len(rows) - len(disagree)
    errors = dict(Counter(e.kind for e in result.errors))
    summary = {"agree": agreed, "rows": len(rows), "timeouts": result.timeouts, "errors": errors,
               "seconds": round(seconds, 2)}
    print(json.dumps(summary))
    return 0 if agreed >= args.min_agree else 1


def _check(args: argparse.Namespace) -> int:
    text = args.completion if args.completion is not None else (
        args.file.read_text() if args.file else sys.stdin.read())
    specs = args.reward or ["math_accuracy", "format"]
    with RewardPool(specs, SandboxConfig(workers=args.workers, timeout_s=args.timeout_s)) as pool:
        result = pool.score([""], [text], answer=[args.answer])
    print(json.dumps(dataclasses.asdict(result)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `sse-rl rewards ...`; returns the exit code."""
    args = _parser().parse_args(argv)
    return _agreement(args) if args.command == "agreement" else _check(args)


if __name__ == "__main__":
    sys.exit(main())
