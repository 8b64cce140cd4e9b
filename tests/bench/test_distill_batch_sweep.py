"""bench/distill_batch_sweep.py: a finished run is not run again, and the report holds each run's held-out KL at the
logits stage's start and end (here: the committed tiny CPU distillation's metrics and resolved recipe)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "tiny_distill_cpu"
METRICS = RESULTS / "distill_metrics.jsonl"


def test_report_of_finished_runs(tmp_path: Path) -> None:
    recipe = yaml.safe_load((RESULTS / "config.yaml").read_text())
    batch, steps = recipe["train"]["batch_tokens"], recipe["logits"]["steps"]
    run = tmp_path / "runs" / f"b{batch}"
    (run / "final").mkdir(parents=True)
    shutil.copy(METRICS, run / "distill_metrics.jsonl")
    subprocess.run([sys.executable, "-m", "bench.distill_batch_sweep", str(ROOT / "recipes" / "tiny_distill_cpu.yaml"),
                    "--teacher", "missing", "--student", "missing", "--out", str(tmp_path / "runs"),
                    "--tokens", str(batch * steps), "--batches", str(batch), "--results", str(tmp_path / "out")],
                   check=True, capture_output=True, cwd=ROOT)
    rows = [json.loads(line) for line in METRICS.read_text().splitlines()]
    kl = [r["distill/eval_kl"] for r in rows if r["stage"] == "logits" and "distill/eval_kl" in r]
    table = (tmp_path / "out" / "batch_sweep.md").read_text()
    assert f"| {batch:,} | {steps} | {kl[0]:.4f} | {kl[-1]:.4f} | {kl[-1] / kl[0]:.3f} |" in table
    saved = json.loads((tmp_path / "out" / "batch_sweep.json").read_text())["held_out_kl"][str(batch)]
    assert [point[1] for point in saved] == kl and saved[-1][0] == steps * batch
    assert (tmp_path / "out" / "batch_sweep.png").stat().st_size > 0
