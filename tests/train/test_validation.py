"""Validation during training: `eval.benchmark` makes the GRPO run call the eval package at step 0, every N steps
and at the end, sampling with the run's engines and grading with the run's reward pool.

One short run of the tiny recipe (3 steps, validation every 2) on a 4-problem jsonl of the toy task; the val/*
rows of metrics.jsonl are checked against the completions the eval package wrote, re-graded here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sse_rl.config import RecipeError
from sse_rl.metrics_log import read_metrics
from sse_rl.tasks.max_digit import max_digit_reward
from sse_rl.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")
PROBLEMS = [("max(3,7,1)=", 7), ("max(0,2,9)=", 9), ("max(5,5,4)=", 5), ("max(8,1,6)=", 8)]
SAMPLES = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("val")
    data = tmp / "digits.jsonl"
    data.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in PROBLEMS))
    out = tmp / "run"
    args = [f"out_dir={out}", "train.steps=3", "train.prompts_per_step=8", "data.eval=", "eval.num_prompts=0",
            f"eval.benchmark={data}", f"eval.benchmark_samples={SAMPLES}", "eval.benchmark_every=2",
            "eval.benchmark_temperature=1.0", "eval.benchmark_top_p=1.0", "run.save_every=0",
            "run.report_to=[]", "run.progress=false"]
    proc = subprocess.run([sys.executable, "-m", "sse_rl.train", TINY, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_val_metrics_at_start_every_n_and_end_match_the_written_completions(run):
    rows = {r["step"]: r for r in read_metrics(run)}
    assert sorted(rows) == [0, 1, 2, 3]
    assert [s for s, r in rows.items() if "val/avg@4" in r] == [0, 2, 3]
    for step in (0, 2, 3):
        row = rows[step]
        keys = {k for k in row if k.startswith("val/")}
        assert keys == {"val/avg@4", "val/pass@1", "val/pass@2", "val/pass@4", "val/maj@1", "val/maj@2",
                        "val/maj@4", "val/se_problems", "val/se_samples", "val/mean_tokens",
                        "val/truncation_rate"}, step
        folder = run / "val" / f"step_{step:04d}"
        records = [json.loads(line) for line in (folder / "completions.jsonl").read_text().splitlines()]
        assert sorted((r["problem_id"], r["sample"]) for r in records) == [
            (str(i + 1), s) for i in range(len(PROBLEMS)) for s in range(SAMPLES)]
        # the grade is the run's accuracy reward (the toy task's), applied to the stored completion
        golds = [r["gold"] for r in records]
        assert golds == [str(PROBLEMS[int(r["problem_id"]) - 1][1]) for r in records]
        regraded = max_digit_reward([""] * len(records), [r["completion"] for r in records], answer=golds)
        assert [r["score"] for r in records] == regraded and [r["correct"] for r in records] == [
            s == 1.0 for s in regraded]
        correct = {p: [r["correct"] for r in records if r["problem_id"] == p] for p in {r["problem_id"]
                                                                                          for r in records}}
        assert row["val/avg@4"] == pytest.approx(sum(regraded) / len(regraded))
        assert row["val/pass@4"] == pytest.approx(sum(any(c) for c in correct.values()) / len(correct))
        assert row["val/pass@1"] == pytest.approx(row["val/avg@4"])
        assert row["val/mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in records) / len(records))
        assert row["val/truncation_rate"] == pytest.approx(
            sum(r["finish_reason"] == "length" for r in records) / len(records))
        assert all(r["num_tokens"] <= 1 for r in records)  # rollout.max_tokens of the tiny recipe
        for key in keys - {"val/mean_tokens", "val/se_problems", "val/se_samples"}:
            assert 0.0 <= row[key] <= 1.0, (step, key)
        results = json.loads((folder / "results.json").read_text())
        assert results["benchmarks"]["digits"]["metrics"]["avg"] == pytest.approx(row["val/avg@4"])
        assert (folder / "summary.md").read_text().startswith("# Eval of")
        assert (folder / "digits.png").read_bytes()[:4] == b"\x89PNG"
    assert not (run / "val" / "step_0001").exists()


def test_bad_validation_settings_name_their_key(tmp_path):
    with pytest.raises(RecipeError) as info:
        main([TINY, f"out_dir={tmp_path / 'a'}", "eval.benchmark_samples=0", "eval.benchmark_max_tokens=32",
              "eval.benchmark_top_p=0"])
    assert [e.split(":")[0] for e in info.value.errors] == [
        "eval.benchmark_samples", "eval.benchmark_top_p", "eval.benchmark_max_tokens"], info.value.errors
    with pytest.raises(RecipeError, match=r"eval.benchmark: 'aime2024' is neither a .jsonl/.parquet file nor a "
                                          r"benchmark of the eval package \(aime24, aime25, math500\)"):
        main([TINY, f"out_dir={tmp_path / 'b'}", "eval.benchmark=aime2024"])
    with pytest.raises(RecipeError, match=r"eval.benchmark: data file .*missing.jsonl does not exist"):
        main([TINY, f"out_dir={tmp_path / 'c'}", f"eval.benchmark={tmp_path / 'missing.jsonl'}"])
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "max(1,2,3)=" * 3, "answer": 3}) + "\n")
    with pytest.raises(RecipeError, match=r"eval.benchmark: 1 problems \(first '1'\) have prompts longer than "
                                          r"rollout.max_model_len - max tokens = 31 tokens"):
        main([TINY, f"out_dir={tmp_path / 'd'}", f"eval.benchmark={long}"])
