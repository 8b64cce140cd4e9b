"""Reward grading throughput: graded completions/s for ~2k-character completions, in-process vs the sandboxed pool.

    .venv/bin/python bench/bench_rewards.py [--n 1000] [--repeats 3] [--out bench/results/rewards_cpu]

Cases:
1) `int` golds (AIME-style): the integer fast path, no sympy.
2) `latex` golds (fractions): every sample goes through math-verify parse + verify.
Modes: `math_accuracy` in this process (no sandbox), `RewardPool` with 1 and 2 workers (math_accuracy only), and
`RewardPool` with 2 workers and 3 rewards (math_accuracy + format + overlong, i.e. 3 tasks per completion).
Pool overhead = pool(1 worker) time per completion minus in-process time per completion (dispatch + pickling).
Numbers are medians over repeats, on warm workers; the machine's load average is recorded because it is shared.
"""
import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from sse_rl.rewards import RewardPool, RewardSpec, SandboxConfig, math_accuracy

PROSE = (r"We set $a_n = \frac{n(n+1)}{2}$ and note that $a_n - a_{n-1} = n$, so summing over $1 \le n \le k$ "
         r"gives a telescoping series. Substituting $x = 3$ into $x^2 + 2x + 1 = (x+1)^2$ yields $16$. ")


def make_batch(n: int, kind: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """n completions of ~2,000 characters (think block + answer), half of them correct."""
    rng = random.Random(seed)
    completions, golds = [], []
    for i in range(n):
        k = rng.randint(2, 997)
        if kind == "int":
            gold, pred = str(k), str(k if i % 2 == 0 else k + 1)
        else:
            gold, pred = rf"\frac{{{k}}}{{1009}}", rf"\frac{{{2 * k if i % 2 == 0 else 2 * k + 1}}}{{2018}}"
        body = (PROSE * 12)[:1900]
        completions.append(f"<think>{body}</think>The answer is $\\boxed{{{pred}}}$.")
        golds.append(gold)
    return completions, golds


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_case(kind: str, n: int, repeats: int) -> dict:
    completions, golds = make_batch(n, kind)
    prompts, ids = ["p"] * n, [[0] * 500] * n
    expected = [float(i % 2 == 0) for i in range(n)]
    assert math_accuracy(prompts, completions, answer=golds) == expected, "bench batch graded wrongly"
    row = {"case": kind, "n": n, "mean_chars": round(statistics.mean(map(len, completions)))}
    row["in_process_s"] = timed(lambda: math_accuracy(prompts, completions, answer=golds), repeats)
    pools = {"pool_1w": (1, ["math_accuracy"]), "pool_2w": (2, ["math_accuracy"]),
             "pool_2w_3rewards": (2, ["math_accuracy", "format", RewardSpec("overlong", kwargs={
                 "max_length": 1000, "cache_length": 200})])}
    for name, (workers, rewards) in pools.items():
        with RewardPool(rewards, SandboxConfig(workers=workers)) as pool:
            first = pool.score(prompts, completions, answer=golds, completion_ids=ids)  # warm-up
            assert first.per_function["math_accuracy"] == expected and first.timeouts == 0
            row[f"{name}_s"] = timed(lambda: pool.score(prompts, completions, answer=golds, completion_ids=ids),
                                     repeats)
    for mode in ("in_process", "pool_1w", "pool_2w", "pool_2w_3rewards"):
        row[f"{mode}_per_s"] = round(n / row[f"{mode}_s"], 1)
    row["pool_overhead_ms_per_completion"] = round(1e3 * (row["pool_1w_s"] - row["in_process_s"]) / n, 3)
    return row


def device() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}


def write_markdown(path: Path, result: dict) -> None:
    d = result["device"]
    lines = [f"# Reward grading throughput ({d['cpu']}, {d['cores']} cores, load avg {d['load_avg_1m_at_start']})",
             "", "~2k-character completions, graded completions per second (median of repeats, warm workers).", "",
             ("| gold | n | in-process | pool 1 worker | pool 2 workers | pool 2 workers, 3 rewards | "
             "pool overhead (ms/completion) |"), "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['n']} | {r['in_process_per_s']} | {r['pool_1w_per_s']} | "
                     f"{r['pool_2w_per_s']} | {r['pool_2w_3rewards_per_s']} | {r['pool_overhead_ms_per_completion']} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/rewards_cpu"))
    args = parser.parse_args()
    result = {"device": device(), "command": f"bench/bench_rewards.py --n {args.n} --repeats {args.repeats}",
              "rows": [bench_case(kind, args.n, args.repeats) for kind in ("int", "latex")]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(args.out.with_suffix(".md"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
