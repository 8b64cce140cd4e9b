"""The check after every sync: do the engines sample from the weights the trainer holds?

First-token top-k logprobs of a fixed probe batch, engine vs trainer: the max |difference| is logged every step as
probe/max_abs_diff and compared with `run.probe_tolerance`. A difference over the tolerance is a warning (the run
goes on); a non-finite one means the engines or the trainer hold non-finite weights, and the run stops.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import ray

from sse_rl.grpo.guard import NonFiniteError

logger = logging.getLogger(__name__)


def probe(trainers: list[Any], engine: Any, prompt_ids: list[list[int]], top_k: int = 5) -> float:
    """Max |engine - trainer| first-token logprob over the probe prompts and the engine's top-k tokens (every rank
    runs the forward, a collective under fsdp2; rank 0's answer is compared)."""
    engine_lps = ray.get(engine.first_token_logprobs.remote(prompt_ids, top_k))
    tokens = [list(lps) for lps in engine_lps]
    trainer_lps = ray.get([t.first_token_logprobs.remote(prompt_ids, tokens) for t in trainers])[0]
    return max(abs(e[t] - lp) for e, toks, tr in zip(engine_lps, tokens, trainer_lps) for t, lp in zip(toks, tr))


def check(diff: float, tolerance: float, step: int) -> None:
    """Warn (the run goes on) when the probe's difference exceeds the tolerance; NonFiniteError when it is not finite
    (`diff > tolerance` is False for NaN)."""
    if not math.isfinite(diff):
        raise NonFiniteError(f"probe/max_abs_diff is {diff}: engine or trainer first-token logprobs are not finite "
                             "after the weight sync")
    if diff > tolerance:
        logger.warning("step %d: engine and trainer first-token logprobs differ by %.2e (> %.1e): rollouts do not "
                       "come from the trained policy", step, diff, tolerance)
