"""Shaping rewards (`format`, `overlong`) and the weighted combination of several rewards.

Choices:
1) `format` is binary: one `</think>` (with at most one `<think>` before it), some reasoning before it, and a
   closed `\\boxed{...}` after it. Chat templates that open `<think>` in the prompt are covered.
2) `overlong` is DAPO's soft overlong penalty on the completion length in tokens (`completion_ids`, which TRL
   passes to every reward): 0 up to `max_length - cache_length`, then a linear ramp down to -1 at `max_length`.
   Its two parameters are bound with `functools.partial` or `RewardSpec(kwargs=...)`, keeping it picklable.
3) `combine` follows TRL: a weighted sum over the rewards that apply (None = not applicable); None when none do.
"""
from typing import Any

from sse_rl.rewards.math_reward import completion_text, last_boxed


def _format_ok(text: str) -> bool:
    if text.count("</think>") != 1 or text.count("<think>") > 1:
        return False
    reasoning, _, answer = text.partition("</think>")
    before, opened, reasoning = reasoning.rpartition("<think>")
    if opened and before.strip():
        return False
    return bool(reasoning.strip()) and last_boxed(answer) is not None


def format_reward(prompts: list, completions: list, **columns: Any) -> list[float]:
    """TRL reward (registry name `format`): 1.0 for `reasoning</think> ... \\boxed{answer}`, else 0.0.

    >>> format_reward([""] * 3, ["<think>x</think> \\\\boxed{1}", "x</think> \\\\boxed{1}", "\\\\boxed{1}"])
    [1.0, 1.0, 0.0]
    """
    return [float(_format_ok(completion_text(c))) for c in completions]


def overlong(prompts: list, completions: list, completion_ids: list[list[int]], max_length: int,
             cache_length: int, **columns: Any) -> list[float]:
    """TRL reward: DAPO soft overlong penalty in [-1, 0] from each completion's token count.

    Args:
        completion_ids: token ids of each completion (TRL passes them; so does `RewardPool` when given).
        max_length: the generation limit L_max, in tokens.
        cache_length: width of the penalty ramp L_cache (0 < cache_length <= max_length), in tokens.

    >>> overlong([""] * 3, [""] * 3, [[0] * 6, [0] * 9, [0] * 12], max_length=10, cache_length=4)
    [0.0, -0.75, -1.0]
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong needs 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    if len(completion_ids) != len(completions):
        raise ValueError(f"overlong: {len(completions)} completions but {len(completion_ids)} completion_ids")
    start = max_length - cache_length
    return [max(-1.0, min(0.0, (start - len(ids)) / cache_length)) for ids in completion_ids]


def combine(per_function: dict[str, list[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Weighted sum per sample over the functions that apply; None where every function returned None.

    >>> combine({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 1.0, "b": 2.0})
    [2.0, 2.0, None]
    """
    if set(per_function) != set(weights):
        raise ValueError(f"combine: rewards {sorted(per_function)} but weights for {sorted(weights)}")
    lengths = {name: len(values) for name, values in per_function.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"combine: reward lists differ in length: {lengths}")
    totals: list[float | None] = []
    for values in zip(*per_function.values()):
        applied = [weights[name] * v for name, v in zip(per_function, values) if v is not None]
        totals.append(sum(applied) if applied else None)
    return totals
