"""bench/replay_report.py (issue #28) on the metrics of two real short GRPO runs, replay on and off
(tests/bench/data/replay_tiny: tiny_cpu, 4 steps, CPU): the report's numbers are the runs' own, each in its place."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sse_rl.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RUNS = Path(__file__).parent / "data" / "replay_tiny"


def _report(tmp_path: Path, out: Path = RUNS) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.replay_report", str(out), "--name", "tiny",
                           "--results", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_report_table_json_plot_and_copies_follow_the_runs(tmp_path: Path) -> None:
    done = _report(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "tiny"
    summary = json.loads((folder / "replay.json").read_text())["summary"]
    table = (folder / "replay.md").read_text()
    assert (folder / "replay.png").read_bytes()[:4] == b"\x89PNG"
    for arm in ("on", "off"):
        rows = read_metrics(RUNS / f"grpo_replay_{arm}")
        evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        flips = np.mean([r["mismatch/route_flip_rate"] for r in rows if "mismatch/route_flip_rate" in r])
        diff = np.mean([r["mismatch/abs_logprob_diff/mean"] for r in rows if "mismatch/abs_logprob_diff/mean" in r])
        s = summary[arm]
        assert (s["accuracy_start"]["step"], s["accuracy_start"]["value"]) == evals[0]
        assert (s["accuracy_end"]["step"], s["accuracy_end"]["value"]) == evals[-1] and evals[-1][0] == 4
        means = s["mismatch_mean_over_steps"]
        assert means["mismatch/route_flip_rate"] == flips and means["mismatch/abs_logprob_diff/mean"] == diff
        # one-token responses: only the first position bucket has tokens
        assert means["mismatch/abs_logprob_diff/pos_0_63"] is not None
        assert means["mismatch/abs_logprob_diff/pos_1024_plus"] is None
        (row,) = [line for line in table.splitlines() if line.startswith(f"| {arm} |")]
        assert f"| {evals[0][1]:.4f} ({evals[0][0]}) | {evals[-1][1]:.4f} ({evals[-1][0]}) |" in row
        assert f"| {flips:.3g} | {diff:.3g} |" in row and row.endswith("| – | – | – |")
        assert (folder / f"replay_{arm}" / "metrics.jsonl").read_text() == \
            (RUNS / f"grpo_replay_{arm}" / "metrics.jsonl").read_text()
    # both runs start from the same policy and eval seeds, so the step-0 accuracy is the same
    assert summary["on"]["accuracy_start"] == summary["off"]["accuracy_start"]
    assert summary["on"]["mismatch_mean_over_steps"]["mismatch/route_flip_rate"] == 0.0  # replay: by construction


def test_missing_run_is_named(tmp_path: Path) -> None:
    done = _report(tmp_path, out=tmp_path / "nowhere")
    assert done.returncode != 0 and "grpo_replay_on/metrics.jsonl" in done.stderr and "replay" in done.stderr
