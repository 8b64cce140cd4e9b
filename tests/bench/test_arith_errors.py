"""bench/arith_errors.py: each wrong sample of an arithmetic eval counted once, by its first error."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "Grace earns 24 dollars a day for 5 days. Grace earns 2 more dollars. How many dollars does Grace have now?"


def _kind(monkeypatch, completion: str) -> str:
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.arith_errors").error_kind(PROBLEM, completion)


def test_a_wrong_step_is_arithmetic_even_after_a_right_first_step(monkeypatch):
    assert _kind(monkeypatch, "5 x 24 = 120. 120 + 2 = 124. The answer is \\boxed{124}.") == "arithmetic"


def test_a_first_operand_not_in_the_problem_is_recall(monkeypatch):
    assert _kind(monkeypatch, "6 x 24 = 144. 144 + 2 = 146. The answer is \\boxed{146}.") == "recall"


def test_right_steps_with_a_wrong_operation_are_other(monkeypatch):
    assert _kind(monkeypatch, "5 x 24 = 120. 120 - 2 = 118. The answer is \\boxed{118}.") == "other"
    assert _kind(monkeypatch, "The answer is \\boxed{7}.") == "other"


def test_the_report_counts_only_wrong_samples_by_problem_id(tmp_path):
    from sse_rl.tasks.arithmetic import rows_with_ids

    first, second = rows_with_ids("test")[:2]
    samples = [(first, first["solution"], True), (first, "1 x 1 = 3. The answer is \\boxed{3}.", False),
               (second, second["solution"], True)]
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps({"problem_id": row["id"], "completion": text, "correct": ok}) + "\n"
                                   for row, text, ok in samples))
    proc = subprocess.run([sys.executable, "-m", "bench.arith_errors", f"m={completions}", "--out",
                           str(tmp_path / "errors")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "errors.json").read_text()) == {
        "m": {"samples": 3, "wrong": 1, "arithmetic": 1, "recall": 0, "other": 0}}
    assert "| m | 3 | 1 | 1 | 0 | 0 |" in (tmp_path / "errors.md").read_text()
