"""Routing replay on vs off in GRPO (issue #28): two runs of one recipe from one checkpoint, both recording routes,
compared by held-out accuracy and the rollout/trainer mismatch they logged.

    scripts/arith_demo.sh OUT replay               # the two arithmetic-demo runs, then this report
    python -m bench.replay_report OUT              # OUT/grpo_replay_on and OUT/grpo_replay_off -> NAME = basename OUT

Writes bench/results/mismatch/NAME/: replay.md (device, per run: held-out accuracy at the first and last eval,
the mean over training steps of `mismatch/route_flip_rate`, `mismatch/abs_logprob_diff/mean` and its position
buckets), replay.json (the same numbers), replay.png (curves of both runs: held-out accuracy, training reward,
|delta logprob|, flip rate) and each run's metrics.jsonl and config.yaml. Run it on the machine the runs ran on:
the device named is this machine's. Under replay the trainer uses the engine's partitions, so that run's flip rate
is 0 by construction; the other run's rate is what replay removes.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import device_name, write_results
from bench.plot_runs import plot_runs
from sse_rl.grpo.mismatch import BUCKET_NAMES
from sse_rl.metrics_log import METRICS_FILE, read_metrics

ARMS = ("on", "off")
ACCURACY = "eval/accuracy"
FLIPS = "mismatch/route_flip_rate"
DIFF = "mismatch/abs_logprob_diff/mean"
CURVES = (ACCURACY, "reward/mean", DIFF, FLIPS)


def run_dirs(out: Path) -> dict[str, Path]:
    """The two runs of `scripts/arith_demo.sh OUT replay`, by arm."""
    return {arm: out / f"grpo_replay_{arm}" for arm in ARMS}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's reported numbers from its metrics rows: held-out accuracy at its first and last eval (with their
    steps), and the mean over training steps of each mismatch statistic (None where the run logged none)."""
    evals = [(r["step"], r[ACCURACY]) for r in rows if ACCURACY in r]
    if not evals:
        raise ValueError(f"no {ACCURACY} rows: the runs need a held-out set (data.eval) and eval.every")
    keys = [FLIPS, DIFF, *(f"mismatch/abs_logprob_diff/{name}" for name in BUCKET_NAMES)]
    means = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        means[key] = float(np.mean(values)) if values else None
    return {"steps": max(r["step"] for r in rows), "accuracy_start": {"step": evals[0][0], "value": evals[0][1]},
            "accuracy_end": {"step": evals[-1][0], "value": evals[-1][1]}, "mismatch_mean_over_steps": means}


def markdown(summary: dict[str, dict[str, Any]], device: str, runs: dict[str, Path]) -> str:
    """The report: what ran where, and one table row per run."""
    buckets = [f"mismatch/abs_logprob_diff/{name}" for name in BUCKET_NAMES]
    head = ["routing replay", "steps", "held-out acc. start", "held-out acc. end", "route_flip_rate",
            "abs_logprob_diff mean", *BUCKET_NAMES]
    lines = ["# Routing replay on vs off in GRPO (issue #28)", "",
             f"Device: {device}. Runs: " + ", ".join(f"`{path}`" for path in runs.values()) +
             " (metrics.jsonl and config.yaml of each in this folder). Held-out accuracy: `eval/accuracy` at the "
             "run's first and last eval (step in brackets). Mismatch columns: the mean over training steps of "
             "`mismatch/route_flip_rate`, `mismatch/abs_logprob_diff/mean` and its response-position buckets. "
             "With replay on the trainer uses the engine's partitions, so its flip rate is 0 by construction.",
             "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm, s in summary.items():
        m = s["mismatch_mean_over_steps"]
        start, end = s["accuracy_start"], s["accuracy_end"]
        cells = [arm, str(s["steps"]), f"{start['value']:.4f} ({start['step']})", f"{end['value']:.4f} ({end['step']})",
                 *(_number(m[key]) for key in (FLIPS, DIFF, *buckets))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def report(out: Path, results: Path, device: str) -> Path:
    """Write the report of the runs under `out` into `results` (module doc); returns the markdown's path."""
    runs = run_dirs(out)
    missing = [str(path / METRICS_FILE) for path in runs.values() if not (path / METRICS_FILE).is_file()]
    if missing:
        raise SystemExit(f"no metrics at {', '.join(missing)}: run scripts/arith_demo.sh {out} replay first")
    summary = {arm: summarize(read_metrics(path)) for arm, path in runs.items()}
    for arm, path in runs.items():
        (results / f"replay_{arm}").mkdir(parents=True, exist_ok=True)
        for name in (METRICS_FILE, "config.yaml"):
            if (path / name).is_file():
                shutil.copy(path / name, results / f"replay_{arm}" / name)
    write_results(results / "replay.json", {"device": device, "runs": {arm: str(p) for arm, p in runs.items()},
                                            "summary": summary}, markdown(summary, device, runs))
    plot_runs({f"replay {arm}": path / METRICS_FILE for arm, path in runs.items()}, list(CURVES),
              results / "replay.png", title=f"routing replay on vs off ({device})")
    return results / "replay.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the demo's OUT: holds grpo_replay_on/ and grpo_replay_off/")
    parser.add_argument("--name", help="results folder name (default: OUT's name)")
    parser.add_argument("--results", type=Path, default=Path("bench/results/mismatch"), help="parent of NAME")
    args = parser.parse_args(argv)
    path = report(args.out, args.results / (args.name or args.out.resolve().name), device_name())
    print(f"wrote {path.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
