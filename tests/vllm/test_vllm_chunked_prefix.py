"""Chunked prefill and prefix caching with SSE-H in vLLM (CPU): still the HF model's greedy tokens.

The engine gets a 64-token step budget, so long prompts are prefilled in chunks, each resuming from the SSE state
the previous chunk left in the cache, while shorter requests decode in the same steps. Prefix caching is on (vLLM's
default for hybrids), which for SSE-H selects the "align" state-cache mode: states are kept at block boundaries
(the block size vLLM derives from the state size, 256 tokens for the tiny model) and a repeated prefix resumes
from such a cached state.
"""
from __future__ import annotations

import pytest
import torch
from vllm_testing import assert_matches_hf, engine_env, greedy, load_hf, make_llm, random_prompts

pytestmark = pytest.mark.slow  # starts vLLM engines

# On CUDA vLLM's unified page gives the tiny model a 160-token block, and align mode needs budget >= block size.
STEP_TOKEN_BUDGET = 256 if torch.cuda.is_available() else 64
LONG_PROMPTS = [4 * STEP_TOKEN_BUDGET + 44, 4, 3 * STEP_TOKEN_BUDGET + 8, 9]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    with engine_env():
        llm = make_llm(tiny_checkpoints.w0, max_num_batched_tokens=STEP_TOKEN_BUDGET, enable_prefix_caching=True)
        yield llm
        del llm


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints):
    return load_hf(tiny_checkpoints.w0)


def test_chunked_prefill_mixed_with_decodes(engine, hf_model):
    # The long prompts take 5 and 4 steps of the budget; the short ones decode while they are being prefilled.
    prompts = random_prompts(LONG_PROMPTS, vocab_size=512, seed=1)
    completions = greedy(engine, prompts, NEW_TOKENS)
    assert_matches_hf(hf_model, completions)


def test_prefix_cache_hits_resume_from_cached_state(engine, hf_model):
    block = engine.llm_engine.vllm_config.cache_config.block_size  # 256 here; states are cached per block
    assert engine.llm_engine.vllm_config.cache_config.mamba_cache_mode == "align"
    (base,) = random_prompts([block + 44], vocab_size=512, seed=2)
    first = greedy(engine, [base], NEW_TOKENS)
    # Same prompt again, and one sharing its first block + 24 tokens: both resume from the state cached at `block`.
    again = greedy(engine, [base, base[: block + 24] + [5, 6, 7]], NEW_TOKENS)
    assert [c.num_cached_tokens for c in again] == [block, block]
    assert again[0].tokens == first[0].tokens
    assert_matches_hf(hf_model, first + again)
