"""The non-finite guard on the real program: the tiny recipe with a fault injected stops with a non-zero exit status
and a message naming the step and the quantity, and saves no checkpoint of non-finite weights."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains the tiny recipe on Ray

ROOT = Path(__file__).resolve().parents[2]


def _train(out_dir: Path, *overrides: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "sse_rl.train", "recipes/tiny_cpu.yaml", f"out_dir={out_dir}",
                           "train.steps=3", "run.save_every=1", "eval.every=0", "run.progress=false", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=420)
    return proc.returncode, proc.stdout + proc.stderr


def test_infinite_lr_stops_before_the_weights_are_synced_or_saved(tmp_path):
    code, log = _train(tmp_path / "run", "train.lr=.inf")
    assert code == 1, log[-3000:]
    assert "run stopped at step 1: weights after the update:" in log, log[-3000:]
    assert "no checkpoint was saved" in log
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_a_nan_reward_stops_the_run_naming_the_function_and_sample(tmp_path):
    functions = ("reward.functions=[{spec: sse_rl.tasks.max_digit:max_digit_reward}, "
                 "{spec: tests/train/nan_reward.py:nan_reward, weight: 0.1}]")
    code, log = _train(tmp_path / "run", functions, "data.eval=", "eval.num_prompts=0")
    assert code == 1, log[-3000:]
    assert "run stopped at step 1: reward function 'nan_reward' returned nan for completion" in log, \
        log[-3000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_with_reward_non_finite_zero_a_nan_reward_scores_0_and_is_counted(tmp_path):
    functions = ("reward.functions=[{spec: sse_rl.tasks.max_digit:max_digit_reward}, "
                 "{spec: tests/train/nan_reward.py:nan_reward, weight: 0.1}]")
    code, log = _train(tmp_path / "run", functions, "reward.non_finite=zero", "data.eval=", "eval.num_prompts=0")
    assert code == 0, log[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    counts = [row["reward/non_finite"] for row in rows if "reward/non_finite" in row]
    assert len(counts) == 3 and sum(counts) > 0, counts  # the completion "7" came up and was scored 0
    assert all(math.isfinite(row["reward/mean"]) for row in rows if "reward/mean" in row)
