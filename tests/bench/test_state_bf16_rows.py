"""SSE-H-2B with its states stored in bf16 (issue #27) in the vLLM decode benches: its engine options and the bytes
its decode step moves (CPU only, configs on the meta device)."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch) -> ModuleType:
    """The package `bench` of the repository root (as tests/bench/test_gdn_peer.py imports it)."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for name in ("common", "bench_vllm_throughput", "roofline_decode"):
        importlib.import_module(f"bench.{name}")
    return importlib.import_module("bench")


def test_the_bf16_state_row_asks_vllm_for_a_bf16_state(bench) -> None:
    model = bench.common.DECODE_MODELS["sse-h-2b:state-bf16"]
    assert model.shape == "sse-h-2b" and model.engine == {"mamba_ssm_cache_dtype": "bfloat16"}
    assert model.ssm_cache_dtype == "bfloat16" and bench.common.DECODE_MODELS["sse-h-2b"].ssm_cache_dtype == "auto"


def test_bf16_state_halves_the_state_bytes_of_a_step(bench) -> None:
    config = bench.common.model_config("sse-h-2b").to_dict()
    fp32, bf16 = (bench.roofline_decode.step_bytes(config, 64, 4096, dtype) for dtype in ("auto", "bfloat16"))
    assert bf16["state"] * 2 == fp32["state"] and bf16["weights"] == fp32["weights"] and bf16["kv"] == fp32["kv"]
    # 2B preset: 15 SSE layers of 5 partitions x 10 heads x 256 x 256, K = 1 of N = 4 touched beside the shared one,
    # read and written, in bf16
    assert bf16["state"] == 64 * 15 * 2 * 2 * 10 * 256 * 256 * 2


def test_bf16_state_halves_the_state_bytes_per_sequence(bench) -> None:
    config = bench.common.model_config("sse-h-2b").to_dict()
    (fp32, kv32), (bf16, kv16) = (bench.bench_vllm_throughput.memory_per_sequence(config, 8192, dtype)
                                  for dtype in ("auto", "bfloat16"))
    assert bf16 * 2 == fp32 == 15 * 5 * 10 * 256 * 256 * 4 and kv16 == kv32


def test_each_sse_row_is_compared_with_the_other_models(bench, tmp_path) -> None:
    throughput = bench.bench_vllm_throughput
    rows = [throughput.Result(model, "64x8k", 64, 8192, 70.0, tok_s, 0, 0) for model, tok_s in
            [("sse-h-2b", 7000.0), ("sse-h-2b:state-bf16", 7700.0), ("qwen3-1.7b-shape", 5000.0)]]
    throughput.write_report(rows, tmp_path, {"device": "a card", "vllm": "0.26.0", "torch": "2.11"})
    report = (tmp_path / "vllm_throughput.md").read_text()
    assert "64x8k: sse-h-2b / qwen3-1.7b-shape = 1.40x" in report
    assert "64x8k: sse-h-2b:state-bf16 / qwen3-1.7b-shape = 1.54x" in report
    assert "sse-h-2b / sse-h-2b:state-bf16" not in report
