"""SSE-H with tensor parallelism 2 in vLLM (CPU, gloo): heads sharded, router replicated, same tokens as HF.

Two worker processes, one per core (vLLM's CPU backend binds each rank's threads; the CI machine has 2 cores).
"""
from __future__ import annotations

import pytest
from vllm_testing import assert_matches_hf, engine_env, greedy, load_hf, make_llm, random_prompts

pytestmark = pytest.mark.slow  # starts vLLM engines


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    with engine_env(VLLM_CPU_OMP_THREADS_BIND="0|1"):
        llm = make_llm(tiny_checkpoints.w0, tensor_parallel_size=2)
        yield llm
        del llm


def test_tensor_parallel_greedy_matches_hf(engine, tiny_checkpoints):
    prompts = random_prompts([3, 40, 130], vocab_size=512, seed=4)
    completions = greedy(engine, prompts, 24)
    assert_matches_hf(load_hf(tiny_checkpoints.w0), completions)
