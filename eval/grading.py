"""Grading of eval completions with the training reward, plus the answer each completion votes for in maj@k.

One grader path (`RewardGrader`): the score is one reward function's value from a reward pool's `score`, the vote
is `extract_answer`. `MathGrader` runs it over a local `RewardPool` of `math_accuracy` (text after the last
`</think>`, last `\\boxed{}`, integer fast path, math-verify otherwise); GRPO validation runs it over the run's reward
worker with the recipe's accuracy reward. Either way a pathological completion costs one sandboxed worker a hard
time limit, never the run. The vote of a completion for maj@k is what `math_accuracy` reads: the last box after
`</think>`, as a canonical integer when it is one, else the box content with whitespace removed (but one space kept
between two digits: `3 4` is not 34). Two LaTeX answers that are equal but spelled differently (`\\frac12` and `0.5`)
therefore vote for different answers; for AIME's integer answers the vote is exact.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

from sse_rl.rewards import RewardPool, RewardResult, SandboxConfig
from sse_rl.rewards.math_reward import answer_text, canonical_int, last_boxed


# A space that does not separate two digits (the vote drops it; `3 4` keeps its space).
_DROPPED_SPACE = re.compile(r"(?<![0-9]) | (?![0-9])")


@dataclass(frozen=True)
class Grade:
    score: float | None  # None: the grader could not grade (e.g. it cannot parse the gold answer)
    pred: str | None  # normalised extracted answer, None when nothing was extracted

    @property
    def correct(self) -> bool:
        return self.score is not None and self.score >= 1.0


# (completions, gold answers) -> one Grade per completion
Grader = Callable[[list[str], list[str]], list[Grade]]


def extract_answer(completion: str) -> str | None:
    """The answer a completion votes for in maj@k (see the module docstring)."""
    boxed = last_boxed(answer_text(completion))
    if boxed is None:
        return None
    canonical = canonical_int(boxed)
    return canonical if canonical is not None else _DROPPED_SPACE.sub("", " ".join(boxed.split())) or None


class ScoreFn(Protocol):
    """A reward pool's `score` (`RewardPool.score`, or the GRPO run's reward worker through `sse_rl.actors`)."""

    def __call__(self, prompts: Sequence, completions: Sequence, **columns: Sequence) -> RewardResult: ...


class RewardGrader:
    """The `Grader` of every eval: `reward`'s value from `score` (empty prompts, the golds as the `answer` column),
    `extract_answer`'s vote."""

    def __init__(self, score: ScoreFn, reward: str) -> None:
        self.score, self.reward = score, reward

    def __call__(self, completions: list[str], golds: list[str]) -> list[Grade]:
        result = self.score([""] * len(completions), completions, answer=golds)
        return [Grade(score=s, pred=extract_answer(c)) for s, c in zip(result.per_function[self.reward], completions)]


class MathGrader(RewardGrader):
    """The default `Grader`: `RewardGrader` over `math_accuracy` in a local sandboxed `RewardPool`.

    Holds worker processes: create once, reuse, and close it (or use it as a context manager).
    """

    def __init__(self, sandbox: SandboxConfig | None = None) -> None:
        self.pool = RewardPool(["math_accuracy"], sandbox or SandboxConfig(workers=2))
        super().__init__(self.pool.score, "math_accuracy")

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
