"""Worker processes that run one task at a time under a hard wall-clock limit and a memory bound.

Why not `concurrent.futures.ProcessPoolExecutor`: it cannot kill one stuck worker (killing one breaks the whole
pool), and math-verify's SIGALRM timeouts cannot interrupt a long C-level sympy/gmpy call. Choices:
1) `forkserver` start method with `sse_rl.rewards` preloaded: a replacement worker is a ~20 ms fork of a clean,
   single-threaded server that already imported math-verify and sympy (a cold start costs ~1 s), and unlike
   `fork` it never inherits a parent's threads (Ray, torch, vLLM). That server is multiprocessing's one helper
   per parent process (like its resource tracker): it is shared, and it exits when the parent exits.
2) One pipe per worker; the parent waits on all pipes and process sentinels with the nearest deadline.
3) A worker past its deadline is SIGKILLed and replaced; its task comes back as a "timeout" outcome.
4) `RLIMIT_AS` is set in the worker before it loads anything; a MemoryError comes back as a "memory" outcome.
5) A task's exception comes back with its traceback ("exception"); the caller decides what that means.
6) The deadline starts when a task is handed to a ready worker, so start-up (imports) never eats into it.
7) A worker that died while idle (OOM killer, an operator's kill) is replaced before a task is handed to it; the
   task waits for the replacement instead of failing.
8) Tasks may carry a group (e.g. the reward that grades them): once `max_timeouts` tasks of one group have timed out
   in one `map` call, the group's tasks still queued come back "skipped" without running, so a function that hangs
   on everything costs about `max_timeouts / workers` timeouts per call rather than one per task.
"""
import multiprocessing as mp
import multiprocessing.connection as mpc
import resource
import signal
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Self


class RewardWarning(UserWarning):
    """Base class of the warnings a reward function issues to report per-sample trouble to `RewardPool`."""


class RewardTimeoutWarning(RewardWarning):
    """A reward function hit its own time limit on a sample (e.g. math-verify's alarm); counted as a timeout."""


class SandboxError(RuntimeError):
    """The worker processes cannot run at all (start-up failed), as opposed to one task failing."""


@dataclass(frozen=True)
class SandboxConfig:
    workers: int = 4  # grading processes; a killed worker is replaced
    timeout_s: float = 10.0  # hard wall-clock limit per task, from hand-off to result
    memory_mb: int = 2048  # RLIMIT_AS (address space) per worker, MiB

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"SandboxConfig.workers must be >= 1, got {self.workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 256:
            raise ValueError("SandboxConfig.memory_mb must be >= 256 (Python + sympy need ~100 MiB), "
                             f"got {self.memory_mb}")


@dataclass
class Outcome:
    value: Any = None
    failure: str | None = None  # None | "timeout" | "memory" | "worker_died" | "exception" | "skipped"
    message: str = ""
    seconds: float = 0.0  # hand-off to result, as seen by the parent


def _worker_main(conn: mpc.Connection, setup: Callable[[], Callable[[Any], Any]], memory_mb: int) -> None:
    """Worker loop: bound memory, build the handler once, then answer tasks until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        handler = setup()
    except BaseException:  # noqa: BLE001 - whatever stops start-up is reported to the parent, which raises
        conn.send(("startup_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        try:
            conn.send(("ok", handler(task)))
        except MemoryError:
            conn.send(("memory", f"MemoryError under RLIMIT_AS={memory_mb} MiB"))
        except Exception:  # noqa: BLE001 - the task's error goes back to the parent with its traceback
            conn.send(("exception", traceback.format_exc()))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: mpc.Connection
    ready: bool = False
    index: int | None = None  # task being run
    started: float = 0.0


class Sandbox:
    """A fixed set of worker processes; `map(tasks)` runs `handler(task)` for each, with kill-on-timeout.

    `setup` is a picklable zero-argument callable run once in each worker; it returns the handler. Use as a
    context manager (or call `close()`): workers are daemonic, so they also die with the parent.
    """

    def __init__(self, setup: Callable[[], Callable[[Any], Any]], config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self._setup = setup
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["sse_rl.rewards"])  # no effect if the server already runs
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [self._start() for _ in range(self.config.workers)]

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self._setup, self.config.memory_mb),
                                    daemon=True, name="sse-rl-reward-worker")
        process.start()
        child.close()
        return _Worker(process, parent)

    def pids(self) -> list[int]:
        """Process ids of the current workers (they change when a worker is replaced)."""
        return [w.process.pid for w in self._workers]

    def map(self, tasks: Sequence[Any], groups: Sequence[Hashable] | None = None,
            max_timeouts: int | None = None) -> list[Outcome]:
        """Run every task; outcomes in task order. Thread-safe (calls are serialised).

        With `groups` (one per task) and `max_timeouts`, a group's queued tasks are skipped once that many of its
        tasks have timed out in this call.
        """
        if max_timeouts is not None and (groups is None or len(groups) != len(tasks) or max_timeouts < 1):
            raise ValueError("Sandbox.map: max_timeouts needs >= 1 and one group per task")
        with self._lock:
            if self._closed:
                raise RuntimeError("Sandbox.map called after close()")
            outcomes: list[Outcome | None] = [None] * len(tasks)
            queue = deque(range(len(tasks)))
            timeouts: Counter = Counter()
            try:
                while queue or any(w.index is not None for w in self._workers):
                    self._hand_out(tasks, queue)
                    for index in self._collect(outcomes):
                        if max_timeouts is not None:
                            timeouts[groups[index]] += 1
                            if timeouts[groups[index]] == max_timeouts:
                                self._skip(groups, groups[index], queue, outcomes, max_timeouts)
            except BaseException:
                self._replace_busy()  # never let a stale result reach the next call
                raise
            return outcomes

    def _hand_out(self, tasks: Sequence[Any], queue: deque) -> None:
        for k, w in enumerate(self._workers):
            if not (w.ready and w.index is None and queue):
                continue
            if not w.process.is_alive():
                self._replace(k)
                continue
            index = queue.popleft()
            try:
                w.conn.send(tasks[index])
            except OSError:  # it died after the liveness check: the task goes back to the queue
                queue.appendleft(index)
                self._replace(k)
                continue
            w.index, w.started = index, time.monotonic()

    @staticmethod
    def _skip(groups: Sequence[Hashable], group: Hashable, queue: deque, outcomes: list, max_timeouts: int) -> None:
        """Drop `group`'s queued tasks from `queue`; each comes back as a "skipped" outcome scored 0."""
        message = f"not run: {max_timeouts} tasks of its group timed out in this call (max_timeouts={max_timeouts})"
        kept = [i for i in queue if groups[i] != group]
        for i in queue:
            if groups[i] == group:
                outcomes[i] = Outcome(0.0, "skipped", message, 0.0)
        queue.clear()
        queue.extend(kept)

    def _collect(self, outcomes: list) -> list[int]:
        """Wait for the next message, worker exit or deadline, record what happened; returns the tasks timed out."""
        busy = [w for w in self._workers if w.index is not None]
        deadline = min((w.started + self.config.timeout_s for w in busy), default=None)
        wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        handles = [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]
        mpc.wait(handles, timeout=wait_s)
        timed_out = []
        for k, w in enumerate(self._workers):
            if w.conn.poll():
                self._receive(k, w, outcomes)
            elif not w.process.is_alive():
                self._on_exit(k, w, outcomes)
            elif w.index is not None and time.monotonic() - w.started >= self.config.timeout_s:
                seconds = time.monotonic() - w.started
                outcomes[w.index] = Outcome(0.0, "timeout", f"killed after {seconds:.2f} s "
                                            f"(timeout_s={self.config.timeout_s})", seconds)
                timed_out.append(w.index)
                self._replace(k)
        return timed_out

    def _receive(self, k: int, w: _Worker, outcomes: list) -> None:
        try:
            kind, payload = w.conn.recv()
        except EOFError:
            self._on_exit(k, w, outcomes)
            return
        if kind == "startup_error":
            raise SandboxError(f"a reward worker failed to start:\n{payload}")
        if kind == "ready":
            w.ready = True
            return
        seconds = time.monotonic() - w.started
        if kind == "ok":
            outcomes[w.index] = Outcome(payload, None, "", seconds)
        else:
            outcomes[w.index] = Outcome(0.0, kind, payload, seconds)
        w.index = None

    def _on_exit(self, k: int, w: _Worker, outcomes: list) -> None:
        w.process.join()
        if not w.ready:
            raise SandboxError(f"a reward worker exited with code {w.process.exitcode} before it was ready, see its "
                               "stderr above; a script that starts a pool needs `if __name__ == '__main__':`, "
                               f"and memory_mb={self.config.memory_mb} may be too small")
        if w.index is not None:
            seconds = time.monotonic() - w.started
            outcomes[w.index] = Outcome(0.0, "worker_died", f"worker exited with code {w.process.exitcode}", seconds)
        self._replace(k)

    def _replace(self, k: int) -> None:
        w = self._workers[k]
        w.process.kill()
        w.process.join()
        w.conn.close()
        self._workers[k] = self._start()

    def _replace_busy(self) -> None:
        for k, w in enumerate(self._workers):
            if w.index is not None:
                self._replace(k)

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit; busy or still-starting ones are killed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                if w.ready and w.index is None and w.process.is_alive():
                    try:
                        w.conn.send(None)
                    except OSError:
                        pass
                else:
                    w.process.kill()
            for w in self._workers:
                w.process.join(timeout=2.0)
                if w.process.is_alive():
                    w.process.kill()
                    w.process.join()
                w.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
