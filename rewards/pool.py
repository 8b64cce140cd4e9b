"""`RewardPool`: score a batch with several rewards in sandboxed workers; weighted total plus per-reward values.

Choices:
1) Each reward is called as TRL calls it (`calling.py`: by keyword, on a batch, with `trainer_state`, `log_extra`,
   `log_metric`, async rewards awaited), once per worker's share of the batch: the batch is cut into `workers`
   contiguous slices and each (reward, slice) is one sandbox task under the hard time limit and memory cap. A reward
   sees a slice, as it sees one process's share of the batch under TRL's data parallelism, and the workers grade
   in parallel.
2) A slice call that fails (time limit, memory, a dead worker, an exception) is redone sample by sample, each under
   the time limit again, so a bad sample scores 0 (counted in `errors`) without zeroing its slice; `retried` counts
   these slice calls. A one-sample call's failure is that sample's.
3) Each worker builds the reward functions itself from their `RewardSpec`s (file-path rewards included): only
   specs and batches cross the pipe, and nothing is imported per task.
4) A reward that raises on a sample on its own is a bug: `RewardFunctionError` names the sample and carries the
   worker's traceback, never a silent 0 (one that raises only on a whole slice: the slice's traceback).
   A time limit, memory exhaustion or a dead worker is the sample's fault: 0, recorded in `errors`.
5) `RewardWarning`s a reward issues (e.g. `GoldAnswerWarning`) become `errors` entries; the value stays what the
   reward returned; a `RewardTimeoutWarning` counts as a timeout. Issued during a slice call, the pool cannot tell
   which sample it concerns: the entry's index is None.
6) A reward killed at its time limit on `max_timeouts` samples of one `score` call (in the sample-by-sample
   retries) is reported (a warning that names it) and its retries still queued in that call are skipped: scored 0,
   counted in `skipped` and `errors` ("skipped"), so a reward that hangs on everything costs about one time limit
   for its slices plus `max_timeouts / workers` for the retries, not one per sample. The count starts again at each
   call (each step).
7) A non-finite value (NaN, inf) is passed on as returned, for the caller to stop on, unless the pool is built with
   `zero_non_finite`: then it scores 0, counted in `non_finite` and `errors` ("non_finite", naming the value).
8) `log_metric` values come back per name (`logged`, every value of the call; `metrics()` reports their mean as
   `reward/<name>`), `log_extra` columns one value per completion (`extra`, None where no call logged it).
9) `score_async` runs `score` on one helper thread, so an event loop (async Ray actors) stays free while the
   workers grade.
"""
import asyncio
import functools
import logging
import math
import pickle
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Self

from sse_rl.rewards.calling import CallResult, RewardBatch, RewardCaller, TrainerState, make_batch
from sse_rl.rewards.registry import load_reward
from sse_rl.rewards.sandbox import Outcome, Sandbox, SandboxConfig
from sse_rl.rewards.shaping import combine

logger = logging.getLogger(__name__)
# What the probe grades: a short answer in the shape math rewards expect, with a few stand-in token ids.
PROBE_COMPLETION = "<think>\nprobe\n</think>\n\\boxed{0}"
PROBE_COMPLETION_IDS = [0] * 8


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
    index: int | None  # sample index in the batch; None: a warning issued during a call on several samples
    kind: str  # "timeout" | "memory" | "worker_died" | "skipped" | "non_finite" | a RewardWarning class name
    message: str


@dataclass
class RewardResult:
    total: list[float | None]  # [N] weighted sum over the rewards that apply; None = none applies
    per_function: dict[str, list[float | None]]  # name -> [N]
    timeouts: int  # (reward, sample) pairs that hit a time limit and scored 0
    errors: list[RewardError]
    skipped: int = 0  # (reward, sample) pairs not run (scored 0): their reward hit max_timeouts in this call
    non_finite: int = 0  # (reward, sample) pairs whose value was NaN or inf, scored 0 (`zero_non_finite`)
    retried: int = 0  # calls on several samples that failed and were redone sample by sample (choice 2)
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric name -> every value logged
    extra: dict[str, list] = field(default_factory=dict)  # log_extra column -> [N], None where not logged

    def metrics(self) -> dict[str, float]:
        """Flat scalars for logging: the means of what rewards logged, means per reward and of the total, timeouts,
        skipped calls, non-finite values scored 0, retried calls, errors by kind (built-in names win a clash)."""
        out = {f"reward/{name}": _mean(values) for name, values in self.logged.items()}
        out.update({"reward/mean": _mean(self.total), "reward/timeouts": float(self.timeouts),
                    "reward/skipped": float(self.skipped), "reward/non_finite": float(self.non_finite),
                    "reward/retried": float(self.retried)})
        out.update({f"reward/{name}/mean": _mean(values) for name, values in self.per_function.items()})
        out.update({f"reward/errors/{kind}": float(n) for kind, n in Counter(e.kind for e in self.errors).items()})
        return out


def _mean(values: list[float | None]) -> float:
    applied = [v for v in values if v is not None]
    return sum(applied) / len(applied) if applied else float("nan")


class _RewardRunner:
    """Runs inside a worker: one reward's call on one batch (`RewardCaller`)."""

    def __init__(self, specs: tuple[RewardSpec, ...]):
        self.fns = [spec.build() for spec in specs]
        self.caller = RewardCaller()

    def __call__(self, task: tuple[int, RewardBatch]) -> CallResult:
        which, batch = task
        return self.caller(self.fns[which], batch)


def _slices(n: int, parts: int) -> list[range]:
    """`n` samples cut into at most `parts` contiguous slices of near-equal size."""
    size = max(1, math.ceil(n / parts))
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass
class _Tally:
    """What one `score` call gathers, call by call: values and errors per reward, logged metrics and columns."""

    n: int  # completions in the batch
    values: dict[str, list[float | None]]  # name -> [n]
    errors: dict[str, list[tuple[int, RewardError]]]  # name -> (sample position, for ordering; error)
    logged: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def add(self, name: str, rows: range, out: Outcome) -> None:
        """Record `out`, the outcome of `name`'s call on `rows` (one sample, or a slice that did not fail)."""
        if out.failure == "exception":
            raise RewardFunctionError(f"reward {name!r} raised on sample {rows.start}:\n{out.message}")
        if out.failure is not None:
            self.values[name][rows.start] = 0.0
            self.errors[name].append((rows.start, RewardError(name, rows.start, out.failure, out.message)))
            return
        call: CallResult = out.value
        index = rows.start if len(rows) == 1 else None
        self.values[name][rows.start:rows.stop] = call.values
        self.errors[name] += [(rows.start, RewardError(name, index, kind, text)) for kind, text in call.notes]
        for key, values in call.metrics.items():
            self.logged.setdefault(key, []).extend(values)
        for column, values in call.extra.items():
            self.extra.setdefault(column, [None] * self.n)[rows.start:rows.stop] = values

    def zero_non_finite(self) -> None:
        """NaN and inf score 0, each with a "non_finite" error (choice 7)."""
        for name, values in self.values.items():
            for i, v in enumerate(values):
                if v is not None and not math.isfinite(v):
                    values[i] = 0.0
                    self.errors[name].append((i, RewardError(name, i, "non_finite", f"returned {v}, scored 0")))

    def result(self, weights: dict[str, float], retried: int) -> RewardResult:
        errors = [e for name in weights for _, e in sorted(self.errors[name], key=lambda entry: entry[0])]
        kinds = Counter(e.kind for e in errors)
        return RewardResult(combine(self.values, weights), self.values, kinds["timeout"], errors, kinds["skipped"],
                            kinds["non_finite"], retried, self.logged, self.extra)


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
        self.max_timeouts = max_timeouts  # per reward per `score` call; then its queued retries are skipped
        self.zero_non_finite = zero_non_finite  # NaN/inf scores 0 and is counted (choice 7), else passed on
        self._sandbox = Sandbox(functools.partial(_RewardRunner, specs), config)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-pool")

    def score(self, prompts: Sequence, completions: Sequence, *, trainer_state: TrainerState | None = None,
              **columns: Sequence) -> RewardResult:
        """Grade every completion with every reward (choices 1 and 2).

        Args:
            prompts: [N] prompt texts, or chat-message lists (conversational data: completions become messages).
            completions: [N] generated texts.
            trainer_state: what rewards see as TRL's `trainer_state` (default: step 0).
            columns: dataset columns by keyword, one value per completion (`completion_ids` among them when known).
        """
        batch = make_batch(prompts, completions, columns, trainer_state or TrainerState())
        names = list(self.weights)
        calls = [(f, rows) for f in range(len(names)) for rows in _slices(len(batch), self._sandbox.config.workers)]
        first = self._sandbox.map([(f, batch.select(rows)) for f, rows in calls])
        failed = [(call, out) for call, out in zip(calls, first) if out.failure is not None and len(call[1]) > 1]
        retries = [(f, range(i, i + 1)) for (f, rows), _ in failed for i in rows]
        again = self._sandbox.map([(f, batch.select(rows)) for f, rows in retries], [f for f, _ in retries],
                                  self.max_timeouts)
        tally = _Tally(len(batch), {name: [None] * len(batch) for name in names}, {name: [] for name in names})
        done = [(call, out) for call, out in zip(calls, first) if out.failure is None or len(call[1]) == 1]
        for (f, rows), out in [*done, *zip(retries, again)]:
            tally.add(names[f], rows, out)
        self._report_failed_slices(names, failed)
        if self.zero_non_finite:
            tally.zero_non_finite()
        result = tally.result(self.weights, len(failed))
        if result.errors:
            logger.warning("reward errors: %s", dict(Counter(e.kind for e in result.errors)))
        self._report_skipped(result.errors)
        return result

    @staticmethod
    def _report_failed_slices(names: list[str], failed: list[tuple[tuple[int, range], Outcome]]) -> None:
        """A slice that raised although no sample of it raises alone is the reward's bug (choice 4); the others
        were retried: one warning each."""
        for (f, rows), out in failed:
            if out.failure == "exception":
                raise RewardFunctionError(f"reward {names[f]!r} raised on samples {rows.start}-{rows.stop - 1} "
                                          f"together, though on none alone:\n{out.message}")
            logger.warning("reward %r: its call on samples %d-%d failed (%s: %s); redone sample by sample",
                           names[f], rows.start, rows.stop - 1, out.failure, out.message)

    def _report_skipped(self, errors: list[RewardError]) -> None:
        """One warning per reward that hit `max_timeouts`, naming it and how many of its calls were skipped."""
        timeouts = Counter(e.function for e in errors if e.kind == "timeout")
        for name, n in Counter(e.function for e in errors if e.kind == "skipped").items():
            logger.warning("reward %r timed out on %d samples in this batch (max_timeouts=%d): its other %d calls "
                           "were skipped and score 0; check it for hangs or raise timeout_s", name,
                           timeouts[name], self.max_timeouts, n)

    async def score_async(self, prompts: Sequence, completions: Sequence, *, trainer_state: TrainerState | None = None,
                          **columns: Sequence) -> RewardResult:
        """`score` without blocking the event loop (calls are queued, one batch at a time)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(
            self.score, prompts, completions, trainer_state=trainer_state, **columns))

    def worker_pids(self) -> list[int]:
        return self._sandbox.pids()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._sandbox.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(spec: RewardSpec, prompt: Any, columns: dict[str, Any], timeout_s: float) -> CallResult:
    """`spec`'s reward called once in this process, as the pool calls it, on one dataset row (`prompt`, its
    `columns`) with a stand-in completion: a reward whose signature does not take TRL's call fails in a second,
    before any grading process, engine or trainer starts.

    Raises RewardFunctionError naming the reward and what it raised (or returned), TimeoutError when the call does
    not return within `timeout_s` (it runs on a daemon thread, which is left behind).
    """
    rows = {"completion_ids": [PROBE_COMPLETION_IDS], **{key: [value] for key, value in columns.items()}}
    batch = make_batch([prompt], [PROBE_COMPLETION], rows, TrainerState())
    fn = spec.build()
    box: dict[str, Any] = {}
    thread = threading.Thread(target=_probe_call, args=(fn, batch, box), daemon=True, name=f"probe-{spec.name}")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"reward {spec.name!r} did not return within {timeout_s} s on the probe row")
    if "error" in box:
        err = box["error"]
        raise RewardFunctionError(f"reward {spec.name!r} fails on the probe row (the first training row, completion "
                                  f"{PROBE_COMPLETION!r}): {type(err).__name__}: {err}") from err
    return box["result"]


def _probe_call(fn: Callable, batch: RewardBatch, box: dict[str, Any]) -> None:
    caller = RewardCaller()
    try:
        box["result"] = caller(fn, batch)
    except Exception as err:  # noqa: BLE001 - whatever the reward raises is reported by `probe`
        box["error"] = err
    finally:
        caller.close()
