"""Atomic checkpoints (a crash mid-save keeps the previous one) and metrics logging across a resume."""
from __future__ import annotations

import json

import pytest
import torch

from sse_rl import checkpoint
from sse_rl.metrics_log import MetricsLog, read_metrics


def _writer(payload: str):
    return lambda d: (d / "weights.txt").write_text(payload)


def test_save_latest_and_prune(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, _writer(f"w{step}"), {"sampler": {"epoch": 0, "position": step}}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000004", "step_000006"]
    path = checkpoint.latest(tmp_path)
    assert path.name == "step_000006" and (path / "weights.txt").read_text() == "w6"
    assert checkpoint.load_state(path) == {"step": 6, "sampler": {"epoch": 0, "position": 6}}


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    checkpoint.save(tmp_path, 1, _writer("good"), {}, keep=3)

    def crash(d):
        (d / "weights.txt").write_text("partial")
        raise KeyboardInterrupt("killed while writing")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, crash, {}, keep=3)
    assert (tmp_path / "checkpoints" / "step_000002.tmp").is_dir()
    assert checkpoint.latest(tmp_path).name == "step_000001"
    (tmp_path / "checkpoints" / "latest").unlink()  # also without the pointer file
    assert checkpoint.latest(tmp_path).name == "step_000001"
    assert checkpoint.latest(tmp_path / "elsewhere") is None


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = torch.rand(3)
    checkpoint.set_rng_state(state)
    torch.testing.assert_close(torch.rand(3), a)


def test_metrics_rows_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    log = MetricsLog(tmp_path, total_steps=5, start_step=0, report_to=["tensorboard"], config={}, progress=False)
    log.log(0, {"eval/reward": 0.1})
    for step in range(1, 5):
        log.log(step, {"reward/mean": step / 10, "train/loss": 1.0 - step / 10})
    log.close()
    # resumed from checkpoint 2: rows 3 and 4 belong to the interrupted attempt
    log = MetricsLog(tmp_path, total_steps=5, start_step=2, report_to=[], config={}, progress=False)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    log.log(3, {"reward/mean": 0.33})
    png = log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 3, "reward/mean": 0.33}
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert any((tmp_path / "tensorboard").iterdir())


def test_plot_runs_overlays_runs_and_names_a_bad_run(tmp_path) -> None:
    """bench/plot_runs.py: one panel per key, one line per run; a missing metrics file is named in the error."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    script = Path(__file__).resolve().parents[2] / "bench" / "plot_runs.py"
    runs = []
    for name, slope in (("a", 0.01), ("b", -0.01)):
        path = tmp_path / name / "metrics.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps({"step": s, "reward/mean": 0.5 + slope * s, **(
            {"eval/accuracy": 0.4 + slope * s} if s % 5 == 0 else {})}) + "\n" for s in range(21)))
        runs += ["--run", f"{name}={path}"]
    out = tmp_path / "cmp.png"
    done = subprocess.run([sys.executable, str(script), *runs, "--keys", "eval/accuracy", "reward/mean",
                           "--out", str(out)], capture_output=True, text=True, check=True)
    assert str(out) in done.stdout
    assert Image.open(out).size == (880, 340)  # two panels of 4.4 x 3.4 inches at 100 dpi
    bad = subprocess.run([sys.executable, str(script), "--run", f"c={tmp_path / 'none.jsonl'}", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr
