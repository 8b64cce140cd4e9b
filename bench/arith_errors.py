"""Where an arithmetic-task model's wrong answers go wrong: a miscalculated step, an operand not in the problem, or
something else (no GPU).

    python -m bench.arith_errors NAME=EVAL_COMPLETIONS.jsonl ... --out bench/results/hybrid_demo/RUN/arith_errors

Why: a converted hybrid can fail the arithmetic task in two ways that point to different fixes. Recall: its first
step starts from a number that is not in the problem (copying numbers from the context is what softmax attention
does and linear attention must learn). Arithmetic: a written step `a op b = c` has the wrong c (what the MLPs and the
local context compute). Each wrong sample of an `sse-rl eval` completions file (test split of
`sse_rl.tasks.arithmetic`, matched by problem id) is counted once, in the first of these that holds: arithmetic
(any step's c is wrong), recall (the first step's operands are not both in the problem), other (a wrong operation,
a garbled or missing step).
"""
from __future__ import annotations

import argparse
import json
import operator
import re
from pathlib import Path

from bench.common import write_results
from sse_rl.tasks.arithmetic import rows_with_ids

STEP = re.compile(r"(\d+) ([-+x]) (\d+) = (\d+)")
OPS = {"+": operator.add, "-": operator.sub, "x": operator.mul}
KINDS = ("arithmetic", "recall", "other")


def error_kind(problem: str, completion: str) -> str:
    """The kind of a wrong sample's first error (module doc)."""
    steps = STEP.findall(completion)
    if any(OPS[op](int(a), int(b)) != int(c) for a, op, b, c in steps):
        return "arithmetic"
    numbers = set(re.findall(r"\d+", problem))
    if steps and not {steps[0][0], steps[0][2]} <= numbers:
        return "recall"
    return "other"


def count(path: Path, problems: dict[str, str]) -> dict[str, int]:
    """Samples, wrong samples and wrong samples by kind in one completions file."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    wrong = [r for r in rows if not r["correct"]]
    kinds = [error_kind(problems[r["problem_id"]], r["completion"]) for r in wrong]
    return {"samples": len(rows), "wrong": len(wrong), **{k: kinds.count(k) for k in KINDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=completions.jsonl of an `sse-rl eval` on the test split")
    parser.add_argument("--out", type=Path, required=True, help="report stem: OUT.md and OUT.json")
    args = parser.parse_args()
    problems = {row["id"]: row["problem"] for row in rows_with_ids("test")}
    counts = {name: count(Path(path), problems) for name, path in (run.split("=", 1) for run in args.runs)}
    lines = ["# Wrong answers by their first error (`python -m bench.arith_errors`)", "",
             "| model | samples | wrong | arithmetic | recall | other |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {c['samples']} | {c['wrong']} | {c['arithmetic']} | {c['recall']} | {c['other']} |"
              for name, c in counts.items()]
    write_results(args.out.with_suffix(".json"), counts, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
