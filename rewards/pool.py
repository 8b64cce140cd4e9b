"""`RewardPool`: score a batch with several rewards in sandboxed workers; weighted total plus per-reward values.

Choices:
1) Every (reward, sample) pair is one sandbox task, so a hang or crash costs that pair only and each reward has
   its own per-sample time limit.
2) Each worker builds the reward functions itself from their `RewardSpec`s (file-path rewards included): only
   specs and samples cross the pipe, and nothing is imported per task.
3) A reward that raises is a bug: `RewardFunctionError` carries the worker's traceback, never a silent 0.
   A time limit, memory exhaustion or a dead worker is the sample's fault: 0, recorded in `errors`.
4) `RewardWarning`s a reward issues on a sample (e.g. `GoldAnswerWarning`) become `errors` entries with the
   value the reward returned; a `RewardTimeoutWarning` counts as a timeout.
5) A reward killed at its time limit on `max_timeouts` samples of one `score` call is reported (a warning that
   names it) and its calls still queued in that call are skipped: scored 0, counted in `skipped` and `errors`
   ("skipped"), so a reward that hangs on everything slows a step by a few timeouts, not one per sample, and the
   metrics show it. The count starts again at each call (each step).
6) A non-finite value (NaN, inf) is passed on as returned, for the caller to stop on, unless the pool is built with
   `zero_non_finite`: then it scores 0, counted in `non_finite` and `errors` ("non_finite", naming the value).
7) `score_async` runs `score` on one helper thread, so an event loop (TRL async rewards, async Ray actors)
   stays free while the workers grade.
"""
import asyncio
import functools
import logging
import math
import pickle
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

from sse_rl.rewards.registry import load_reward
from sse_rl.rewards.sandbox import RewardTimeoutWarning, RewardWarning, Sandbox, SandboxConfig
from sse_rl.rewards.shaping import combine

logger = logging.getLogger(__name__)


class RewardFunctionError(RuntimeError):
    """A reward function raised (or returned something other than one float/None per completion)."""


@dataclass
class RewardSpec:
    fn: str | Callable  # a `load_reward` spec, or a picklable callable with TRL's reward signature
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound with functools.partial, e.g. overlong's lengths
    name: str = ""  # key in RewardResult.per_function; default: the function's name

    def __post_init__(self) -> None:
        if not self.name:
            fn = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
            self.name = self.fn.rpartition(":")[2] if isinstance(self.fn, str) else getattr(fn, "__name__", "")
        if not self.name:
            raise ValueError(f"RewardSpec for {self.fn!r} needs an explicit name")

    def build(self) -> Callable:
        fn = load_reward(self.fn) if isinstance(self.fn, str) else self.fn
        return functools.partial(fn, **self.kwargs) if self.kwargs else fn


@dataclass
class RewardError:
    function: str
    index: int  # sample index in the batch
    kind: str  # "timeout" | "memory" | "worker_died" | "skipped" | a RewardWarning class name, e.g. "GoldAnswerWarning"
    message: str


@dataclass
class RewardResult:
    total: list[float | None]  # [N] weighted sum over the rewards that apply; None = none applies
    per_function: dict[str, list[float | None]]  # name -> [N]
    timeouts: int  # (reward, sample) pairs that hit a time limit and scored 0
    errors: list[RewardError]
    skipped: int = 0  # (reward, sample) pairs not run (scored 0): their reward hit max_timeouts in this call
    non_finite: int = 0  # (reward, sample) pairs whose value was NaN or inf, scored 0 (`zero_non_finite`)

    def metrics(self) -> dict[str, float]:
        """Flat scalars for logging: means per reward and of the total, timeouts, skipped calls, non-finite values
        scored 0, errors by kind."""
        def mean(values: list[float | None]) -> float:
            applied = [v for v in values if v is not None]
            return sum(applied) / len(applied) if applied else float("nan")

        out = {"reward/mean": mean(self.total), "reward/timeouts": float(self.timeouts),
               "reward/skipped": float(self.skipped), "reward/non_finite": float(self.non_finite)}
        out.update({f"reward/{name}/mean": mean(values) for name, values in self.per_function.items()})
        out.update({f"reward/errors/{kind}": float(n) for kind, n in Counter(e.kind for e in self.errors).items()})
        return out


class _RewardRunner:
    """Runs inside a worker: calls one reward on one sample, recording the RewardWarnings it issues."""

    def __init__(self, specs: tuple[RewardSpec, ...]):
        self.fns = [spec.build() for spec in specs]

    def __call__(self, task: tuple) -> tuple[float | None, list[tuple[str, str]]]:
        which, prompt, completion, columns = task
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = self.fns[which]([prompt], [completion], **{k: [v] for k, v in columns.items()})
        if not isinstance(values, (list, tuple)) or len(values) != 1:
            raise TypeError(f"expected a list with one reward for one completion, got {str(values)[:200]}")
        value = values[0]
        if value is not None and not isinstance(value, (int, float)):
            raise TypeError(f"expected a float or None, got {type(value).__name__}: {str(value)[:200]}")
        notes = [("timeout" if issubclass(w.category, RewardTimeoutWarning) else w.category.__name__, str(w.message))
                 for w in caught if issubclass(w.category, RewardWarning)]
        return (None if value is None else float(value)), notes


class RewardPool:
    """Weighted rewards graded in a `Sandbox`; create once, reuse for every batch, close (or use `with`).

    >>> with RewardPool(["math_accuracy", RewardSpec("format", weight=0.1)]) as pool:  # doctest: +SKIP
    ...     result = pool.score(prompts, completions, answer=answers)
    """

    def __init__(self, rewards: Sequence[RewardSpec | str], config: SandboxConfig | None = None,
                 max_timeouts: int = 8, zero_non_finite: bool = False):
        specs = tuple(r if isinstance(r, RewardSpec) else RewardSpec(r) for r in rewards)
        if not specs:
            raise ValueError("RewardPool needs at least one reward")
        if max_timeouts < 1:
            raise ValueError(f"RewardPool: max_timeouts must be >= 1, got {max_timeouts}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"RewardPool: reward names must be unique, got {names} (set RewardSpec.name)")
        for spec in specs:
            spec.build()  # fail here, in the caller's process, on a bad spec
            try:
                pickle.dumps(spec)
            except Exception as e:
                raise ValueError(f"reward {spec.name!r} cannot be pickled for the worker processes ({e}); "
                                 "define it at module level or pass a 'module:function' spec") from e
        self.weights = {s.name: s.weight for s in specs}
        self.max_timeouts = max_timeouts  # per reward per `score` call; then its queued calls are skipped
        self.zero_non_finite = zero_non_finite  # NaN/inf scores 0 and is counted (choice 6), else passed on
        self._sandbox = Sandbox(functools.partial(_RewardRunner, specs), config)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-pool")

    def score(self, prompts: Sequence, completions: Sequence, **columns: Sequence) -> RewardResult:
        """Grade every completion with every reward. Columns are dataset columns, one value per completion."""
        n = len(completions)
        for key, values in {"prompts": prompts, **columns}.items():
            if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
                raise ValueError(f"RewardPool.score: {key!r} must be a list with one value per completion ({n})")
        tasks = [(f, prompts[i], completions[i], {k: v[i] for k, v in columns.items()})
                 for f in range(len(self.weights)) for i in range(n)]
        groups = [f for f in range(len(self.weights)) for _ in range(n)]
        outcomes = self._sandbox.map(tasks, groups, self.max_timeouts)
        per_function: dict[str, list[float | None]] = {}
        errors: list[RewardError] = []
        for f, name in enumerate(self.weights):
            values: list[float | None] = []
            for i, out in enumerate(outcomes[f * n:(f + 1) * n]):
                if out.failure == "exception":
                    raise RewardFunctionError(f"reward {name!r} raised on sample {i}:\n{out.message}")
                value, notes = (out.value if out.failure is None else (0.0, [(out.failure, out.message)]))
                if self.zero_non_finite and value is not None and not math.isfinite(value):
                    value, notes = 0.0, [*notes, ("non_finite", f"returned {value}, scored 0")]
                values.append(value)
                errors.extend(RewardError(name, i, kind, message) for kind, message in notes)
            per_function[name] = values
        if errors:
            logger.warning("reward errors: %s", dict(Counter(e.kind for e in errors)))
        self._report_skipped(errors)
        timeouts = sum(e.kind == "timeout" for e in errors)
        skipped = sum(e.kind == "skipped" for e in errors)
        non_finite = sum(e.kind == "non_finite" for e in errors)
        return RewardResult(combine(per_function, self.weights), per_function, timeouts, errors, skipped, non_finite)

    def _report_skipped(self, errors: list[RewardError]) -> None:
        """One warning per reward that hit `max_timeouts`, naming it and how many of its calls were skipped."""
        timeouts = Counter(e.function for e in errors if e.kind == "timeout")
        for name, n in Counter(e.function for e in errors if e.kind == "skipped").items():
            logger.warning("reward %r timed out on %d samples in this batch (max_timeouts=%d): its other %d calls "
                           "were skipped and score 0; check it for hangs or raise timeout_s", name,
                           timeouts[name], self.max_timeouts, n)

    async def score_async(self, prompts: Sequence, completions: Sequence, **columns: Sequence) -> RewardResult:
        """`score` without blocking the event loop (calls are queued, one batch at a time)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self.score, prompts, completions,
                                                                            **columns))

    def worker_pids(self) -> list[int]:
        return self._sandbox.pids()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._sandbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
