"""How a reward function is called: as TRL 1.16's `GRPOTrainer._calculate_rewards` calls it.

Choices:
1) By keyword, on a batch: `fn(prompts=[...], completions=[...], **columns, trainer_state=..., log_extra=...,
   log_metric=...)`, where the columns are the dataset's (one value per completion) and `completion_ids` when the
   caller has them (training always does). Like TRL, a column named `prompt` or `completion` is not passed: the
   prompt reaches the function as `prompts`.
2) Conversational data (prompts that are lists of chat messages) gets each completion as one assistant message,
   `[{"role": "assistant", "content": text}]`, as TRL builds them; plain-text data gets strings.
3) A call that returns an awaitable (an `async def`, a class with an async `__call__`, a partial of either) is awaited
   on the caller's own event loop, kept for the caller's life (one per grading process), as TRL keeps one loop.
4) `log_metric(name, value)` keeps every value under its name (the step reports their mean, as TRL does);
   `log_extra(column, values)` takes one value per completion of the call.
5) The result must hold one number (int, float, numpy or torch scalar) or None per completion; anything else is a
   TypeError, a bug in the function.
6) `RewardWarning`s issued during the call are recorded as (kind, message) for the pool to count; a
   `RewardTimeoutWarning` is kind "timeout".
"""
import asyncio
import inspect
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sse_rl.rewards.sandbox import RewardTimeoutWarning, RewardWarning

NOT_PASSED = ("prompt", "completion")  # dataset columns TRL leaves out of a reward's keyword arguments


@dataclass(frozen=True)
class TrainerState:
    """What a reward sees as TRL's `trainer_state`: the part of transformers' `TrainerState` that describes training
    progress, for rewards that shape themselves by it (e.g. a length penalty that grows with the step)."""

    global_step: int = 0  # the GRPO step whose completions are graded (0 before the first update)
    max_steps: int = 0  # train.steps of the run (0 outside a run)


@dataclass
class RewardBatch:
    """The inputs of one call: `n` completions with their prompts and dataset columns."""

    prompts: list  # [n] str, or chat-message lists (conversational data)
    completions: list  # [n] str, or [{"role": "assistant", "content": str}] for conversational data
    columns: dict[str, list]  # dataset column (completion_ids included when known) -> [n] values
    trainer_state: TrainerState = field(default_factory=TrainerState)

    def __len__(self) -> int:
        return len(self.completions)

    def select(self, rows: range) -> "RewardBatch":
        """The batch of `rows` only (a contiguous share, or one sample for a retry)."""
        return RewardBatch(self.prompts[rows.start:rows.stop], self.completions[rows.start:rows.stop],
                           {k: v[rows.start:rows.stop] for k, v in self.columns.items()}, self.trainer_state)


@dataclass
class CallResult:
    """What one call gave: its values and what it reported on the side."""

    values: list[float | None]  # [n]
    notes: list[tuple[str, str]]  # (kind, message) per RewardWarning issued during the call
    metrics: dict[str, list[float]]  # log_metric name -> values logged
    extra: dict[str, list]  # log_extra column -> [n]


def is_conversational(prompt: Any) -> bool:
    """TRL's test: a prompt that is a list of chat messages (dicts with a role)."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def make_batch(prompts: Sequence, completions: Sequence, columns: dict[str, Sequence],
               trainer_state: TrainerState) -> RewardBatch:
    """The batch a reward sees (choices 1 and 2); ValueError naming a column without one value per completion."""
    n = len(completions)
    for key, values in {"prompts": prompts, **columns}.items():
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
            raise ValueError(f"RewardPool.score: {key!r} must be a list with one value per completion ({n})")
    if n and is_conversational(prompts[0]):
        completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
    kept = {k: list(v) for k, v in columns.items() if k not in NOT_PASSED}
    return RewardBatch(list(prompts), list(completions), kept, trainer_state)


class RewardCaller:
    """Calls reward functions on batches (module docstring); owns the event loop that async rewards run on."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, fn: Callable, batch: RewardBatch) -> CallResult:
        metrics: dict[str, list[float]] = defaultdict(list)
        extra: dict[str, list] = {}

        def log_metric(name: str, value: float) -> None:
            metrics[name].append(float(value))

        def log_extra(column: str, values: list) -> None:
            if len(values) != len(batch):
                raise ValueError(f"log_extra({column!r}, ...): {len(values)} values for {len(batch)} completions")
            extra[column] = list(values)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn(prompts=batch.prompts, completions=batch.completions, **batch.columns,
                     trainer_state=batch.trainer_state, log_extra=log_extra, log_metric=log_metric)
            if inspect.isawaitable(out):
                out = self._run(out)
        notes = [("timeout" if issubclass(w.category, RewardTimeoutWarning) else w.category.__name__, str(w.message))
                 for w in caught if issubclass(w.category, RewardWarning)]
        return CallResult(check_values(out, len(batch)), notes, dict(metrics), extra)

    def _run(self, awaitable: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None


def check_values(out: Any, n: int) -> list[float | None]:
    """`out` as n floats or None (choice 5); TypeError naming what came back otherwise."""
    if not isinstance(out, (list, tuple)) and hasattr(out, "tolist"):  # a numpy array or torch tensor
        out = out.tolist()
    if not isinstance(out, (list, tuple)) or len(out) != n:
        raise TypeError(f"expected a list with one reward per completion ({n}), got {str(out)[:200]}")
    for value in out:
        if value is not None and not isinstance(value, numbers.Real):
            raise TypeError(f"expected a float or None, got {type(value).__name__}: {str(value)[:200]}")
    return [None if v is None else float(v) for v in out]
