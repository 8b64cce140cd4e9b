"""Reward grading throughput: graded completions/s for ~2k-character completions, in-process vs the sandboxed pool.

    .venv/bin/python -m bench.bench_rewards [--n 1000] [--repeats 3] [--out bench/results/rewards_cpu]

Cases:
1) `int` golds (AIME-style): the integer fast path, no sympy.
2) `latex` golds (fractions): every sample goes through math-verify parse + verify.
Modes: `math_accuracy` in this process (no sandbox), `RewardPool` with 1 and 2 workers (math_accuracy only), and
`RewardPool` with 2 workers and 3 rewards (math_accuracy + format + overlong, i.e. 3 tasks per completion).
Throughput is the best wall time of the repeats, on warm workers. The machine is shared (its load average is
recorded), so CPU time is measured too: ms of CPU per completion summed over this process and the workers, which
other tenants barely move. Pool overhead = pool(1 worker) CPU per completion minus in-process CPU per completion
(dispatch, pickling, pipes on both sides).
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import psutil
from sse_rl.rewards import RewardPool, RewardSpec, SandboxConfig, math_accuracy

from bench.common import cpu_name, write_results

PROSE = (r"We set $a_n = \frac{n(n+1)}{2}$ and note that $a_n - a_{n-1} = n$, so summing over $1 \le n \le k$ "
         r"gives a telescoping series. Substituting $x = 3$ into $x^2 + 2x + 1 = (x+1)^2$ yields $16$. ")


def make_batch(n: int, kind: str, seed: int) -> tuple[list[str], list[str]]:
    """n completions of ~2,000 characters (think block + answer), half of them correct, each with its own gold
    (distinct across seeds too), so the per-process gold-parse cache never helps: the worst case."""
    completions, golds = [], []
    for i in range(n):
        k = seed * n + i + 2
        if kind == "int":
            gold, pred = str(k), str(k if i % 2 == 0 else k + 1)
        else:
            gold, pred = rf"\frac{{{k}}}{{1000003}}", rf"\frac{{{2 * k if i % 2 == 0 else 2 * k + 1}}}{{2000006}}"
        body = (PROSE * 12)[:1900]
        completions.append(f"<think>{body}</think>The answer is $\\boxed{{{pred}}}$.")
        golds.append(gold)
    return completions, golds


def _cpu_s(pids: list[int]) -> float:
    return time.process_time() + sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def timed(grade_batch, batches: list, pids: list[int]) -> tuple[float, float]:
    """(best wall seconds, median CPU seconds of this process + `pids`), one call per batch."""
    walls, cpus = [], []
    for completions, golds in batches:
        cpu, start = _cpu_s(pids), time.perf_counter()
        values = grade_batch(completions, golds)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu_s(pids) - cpu)
        assert values == [float(i % 2 == 0) for i in range(len(golds))], "bench batch graded wrongly"
    return min(walls), statistics.median(cpus)


def bench_case(kind: str, n: int, repeats: int) -> dict:
    warm_up, *batches = [make_batch(n, kind, seed) for seed in range(repeats + 1)]
    prompts, ids = ["p"] * n, [[0] * 500] * n
    row = {"case": kind, "n": n, "mean_chars": round(statistics.mean(map(len, warm_up[0])))}
    row["in_process_s"], row["in_process_cpu_s"] = timed(
        lambda completions, golds: math_accuracy(prompts, completions, answer=golds), batches, [])
    pools = {"pool_1w": (1, ["math_accuracy"]), "pool_2w": (2, ["math_accuracy"]),
             "pool_2w_3rewards": (2, ["math_accuracy", "format", RewardSpec("overlong", kwargs={
                 "max_length": 1000, "cache_length": 200})])}
    for name, (workers, rewards) in pools.items():
        with RewardPool(rewards, SandboxConfig(workers=workers)) as pool:
            def grade_batch(completions: list[str], golds: list[str], pool: RewardPool = pool) -> list:
                result = pool.score(prompts, completions, answer=golds, completion_ids=ids)
                assert result.timeouts == 0 and not result.errors, result.errors[:3]
                return result.per_function["math_accuracy"]

            grade_batch(*warm_up)
            row[f"{name}_s"], row[f"{name}_cpu_s"] = timed(grade_batch, batches, pool.worker_pids())
    for mode in ("in_process", "pool_1w", "pool_2w", "pool_2w_3rewards"):
        row[f"{mode}_per_s"] = round(n / row[f"{mode}_s"], 1)
        row[f"{mode}_cpu_ms_per_completion"] = round(1e3 * row[f"{mode}_cpu_s"] / n, 3)
    row["pool_overhead_cpu_ms_per_completion"] = round(1e3 * (row["pool_1w_cpu_s"] - row["in_process_cpu_s"]) / n, 3)
    return row


def device() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def markdown(result: dict) -> str:
    d = result["device"]
    lines = [f"# Reward grading throughput ({d['cpu']}, {d['cores']} cores, load avg {d['load_avg_1m_at_start']})",
             "", "~2k-character completions. Graded completions per second (best of repeats, warm workers), and in",
             "brackets CPU ms per completion (this process + workers; robust to the other tenants' load).", "",
             ("| gold | n | in-process | pool 1 worker | pool 2 workers | pool 2 workers, 3 rewards | "
              "pool overhead (CPU ms/completion) |"), "|---|---|---|---|---|---|---|"]
    modes = ("in_process", "pool_1w", "pool_2w", "pool_2w_3rewards")
    for r in result["rows"]:
        cells = " | ".join(f"{r[f'{m}_per_s']} [{r[f'{m}_cpu_ms_per_completion']}]" for m in modes)
        lines.append(f"| {r['case']} | {r['n']} | {cells} | {r['pool_overhead_cpu_ms_per_completion']} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/rewards_cpu"))
    args = parser.parse_args()
    result = {"device": device(), "command": f"python -m bench.bench_rewards --n {args.n} --repeats {args.repeats}",
              "rows": [bench_case(kind, args.n, args.repeats) for kind in ("int", "latex")]}
    write_results(args.out.with_suffix(".json"), result, markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
