"""The resume contract on the real program: a two-step tiny run, a resume with a changed recipe refused (exit 1, the
keys listed, nothing written), then accepted: the new lr trains the added step and the change is recorded."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sse_rl.metrics_log import RECIPE_CHANGES_FILE, read_metrics

pytestmark = pytest.mark.slow  # trains the tiny recipe on Ray

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["run.save_every=1", "eval.num_prompts=16", "eval.every=0", "run.progress=false"]


def _train(out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sse_rl.train", "recipes/tiny_cpu.yaml", f"out_dir={out_dir}", *ARGS,
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=420)


def test_changed_recipe_is_refused_then_accepted_with_the_new_lr(tmp_path):
    out = tmp_path / "run"
    first = _train(out, "train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    rows = read_metrics(out)

    refused = _train(out, "train.steps=3", "train.lr=2e-3")
    assert refused.returncode == 1 and "train.lr: 0.001 -> 0.002" in refused.stderr
    assert "train.steps: 2 -> 3" in refused.stderr and read_metrics(out) == rows
    assert not (out / RECIPE_CHANGES_FILE).exists()

    accepted = _train(out, "train.steps=3", "train.lr=2e-3", "--accept-changes")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    lr = {r["step"]: r["train/lr"] for r in read_metrics(out) if "train/lr" in r}
    assert lr == {1: 1e-3, 2: 1e-3, 3: 2e-3}  # the scheduler follows the new recipe, not its saved base lr
    changes = [json.loads(line) for line in (out / RECIPE_CHANGES_FILE).read_text().splitlines()]
    assert changes == [{"step": 2, "key": "train.lr", "old": 0.001, "new": 0.002},  # in the schema's order
                       {"step": 2, "key": "train.steps", "old": 2, "new": 3}]
