"""A hybridized Transformer in vLLM (CPU): a Qwen3 teacher (q/k-norm, GQA 4/2, tied embeddings) converted with
attention kept at 2 of its 4 layers; vLLM's greedy tokens are the HF model's, logprobs within LOGPROB_ATOL."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sse_rl.init_model import init_model
from sse_rl.models.hybridize import hybridize
from sse_rl.tokenizer import build_tiny_tokenizer
from transformers import AutoModelForCausalLM
from vllm_testing import assert_matches_hf, engine_env, greedy, load_hf, make_llm, random_prompts

pytestmark = pytest.mark.slow  # starts vLLM engines


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hybrid")
    build_tiny_tokenizer(root / "tokenizer")
    init_model("qwen3-tiny", root / "teacher", tokenizer=str(root / "tokenizer"), seed=3)
    teacher = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():  # q/k-norm and layer norms away from their init of ones, so a dropped one shows
        for name, param in teacher.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    teacher.save_pretrained(root / "teacher")
    return hybridize(root / "teacher", root / "hybrid", [1, 3])


@pytest.fixture(scope="module")
def llm(hybrid: Path):
    with engine_env():
        yield make_llm(str(hybrid))


def test_vllm_greedy_equals_hf_greedy(hybrid: Path, llm) -> None:
    model = load_hf(str(hybrid))
    assert model.config.attn_layers == [1, 3] and model.config.attn_qk_norm and model.config.tie_word_embeddings
    completions = greedy(llm, random_prompts([5, 40, 120], vocab_size=512, seed=1), max_tokens=24)
    assert_matches_hf(model, completions)
