"""bench/bench_grpo_step.py's report (`python -m bench.bench_grpo_step --report`): the committed markdown is what the
script makes of the committed results, and the verdicts follow the numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _report(results: dict, tmp_path: Path) -> str:
    path = tmp_path / "grpo_step.json"
    path.write_text(json.dumps(results))
    subprocess.run([sys.executable, "-m", "bench.bench_grpo_step", "--report", "--results", str(path)],
                   check=True, capture_output=True, cwd=ROOT)
    return path.with_suffix(".md").read_text()


@pytest.mark.parametrize("name", ["grpo_step", "grpo_step_h200"])
def test_committed_report_is_made_from_committed_results(tmp_path, name) -> None:
    results = json.loads((BENCH / "results" / f"{name}.json").read_text())
    assert _report(results, tmp_path) == (BENCH / "results" / f"{name}.md").read_text()


def test_verdicts_follow_mfu_rollout_fraction_and_sync(tmp_path) -> None:
    results = json.loads((BENCH / "results" / "grpo_step.json").read_text())
    sse = results["sse-h-2b"]
    sse["pipeline"]["model_flops"] = 0.31 * 989e12 * sse["pipeline"]["time/train"]  # 31 % MFU
    sse["pipeline"]["throughput/rollout_tokens_per_s"] = 0.95 * sse["plain"]["tokens_per_s"]
    sse["pipeline"]["time/sync"] = 2.5
    qwen = results["qwen3-1.7b-shape"]
    qwen["pipeline"]["throughput/rollout_tokens_per_s"] = 0.8 * qwen["plain"]["tokens_per_s"]
    qwen["pipeline"]["model_flops"] = 0.2 * 989e12 * qwen["pipeline"]["time/train"]  # 20 % MFU
    report = _report(results, tmp_path)
    assert "| 31.0% |" in report.split("| sse-h-2b |")[1].split("\n")[0]
    assert "- sse-h-2b: rollout / plain >= 90 %: met; MFU >= 30 %: met; sync < 2 s: NOT met" in report
    assert "- qwen3-1.7b-shape: rollout / plain >= 90 %: NOT met; MFU >= 30 %: NOT met; sync < 2 s: met" in report
