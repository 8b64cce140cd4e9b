"""Sandbox: hard kill on timeout, memory bound, dead workers replaced, exceptions reported, nothing leaked."""
import os
import time

import psutil
import pytest
from reward_procs import kill_and_wait, reward_children
from sse_rl.rewards import Sandbox, SandboxConfig, SandboxError

TIMEOUT_S = 1.5


def _handler(task: tuple) -> object:
    op, arg = task
    if op == "sleep":
        time.sleep(arg)
        return arg
    if op == "alloc":
        return len(bytearray(arg))
    if op == "exit":
        os._exit(arg)
    if op == "raise":
        raise ValueError(arg)
    if op == "nap":
        time.sleep(arg)
    return os.getpid()


def _setup():
    return _handler


def _bad_setup():
    raise RuntimeError("handler cannot be built: missing model file")



@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(_setup, SandboxConfig(workers=2, timeout_s=TIMEOUT_S, memory_mb=512)) as box:
        yield box


def test_results_come_back_in_task_order(sandbox):
    tasks = [("sleep", 0.2 - 0.02 * i) for i in range(8)]
    outcomes = sandbox.map(tasks)
    assert [o.value for o in outcomes] == [t[1] for t in tasks]
    assert all(o.failure is None for o in outcomes)


def test_both_workers_run_in_parallel(sandbox):
    sandbox.map([("pid", None)] * 2)  # both workers are warm
    start = time.monotonic()
    outcomes = sandbox.map([("sleep", 0.5)] * 4)
    elapsed = time.monotonic() - start
    assert all(o.failure is None for o in outcomes)
    assert 1.0 <= elapsed < 1.8, f"4 x 0.5 s on 2 workers took {elapsed:.2f} s (serial: 2 s)"


def test_timeout_kills_the_worker_and_replaces_it(sandbox):
    sandbox.map([("pid", None)] * 2)
    before = sandbox.pids()
    start = time.monotonic()
    outcomes = sandbox.map([("sleep", 60.0), ("sleep", 0.1)])
    elapsed = time.monotonic() - start
    assert outcomes[0].failure == "timeout" and outcomes[0].value == 0.0
    assert TIMEOUT_S <= outcomes[0].seconds < TIMEOUT_S + 1.0
    assert elapsed < TIMEOUT_S + 1.0
    assert outcomes[1].value == 0.1 and outcomes[1].failure is None
    killed = set(before) - set(sandbox.pids())
    assert len(killed) == 1 and not any(psutil.pid_exists(pid) for pid in killed)
    # the replacement works
    assert all(o.failure is None for o in sandbox.map([("sleep", 0.05)] * 4))


def test_memory_bound_gives_memory_outcome(sandbox):
    outcomes = sandbox.map([("alloc", 1 << 30), ("alloc", 1 << 20)])
    assert outcomes[0].failure == "memory" and "512 MiB" in outcomes[0].message
    assert outcomes[1].value == 1 << 20


def test_dead_worker_is_reported_and_replaced(sandbox):
    outcomes = sandbox.map([("exit", 3), ("sleep", 0.05)])
    assert outcomes[0].failure == "worker_died" and "code 3" in outcomes[0].message
    assert outcomes[1].failure is None
    served_by = {o.value for o in sandbox.map([("sleep", 0.2)] * 2 + [("pid", None)] * 4)}
    assert served_by - {0.2} <= set(sandbox.pids())


def _warm(box: Sandbox) -> None:
    """Return once every worker has served a task, i.e. is started and idle."""
    served: set[int] = set()
    for _ in range(20):
        served |= {o.value for o in box.map([("nap", 0.2)] * len(box.pids()))}
        if served >= set(box.pids()):
            return
    raise AssertionError(f"workers {box.pids()} never all served a task (served: {served})")


def test_worker_killed_while_idle_is_replaced_before_work(sandbox):
    _warm(sandbox)
    killed = sandbox.pids()
    for pid in killed:
        kill_and_wait(pid)
    outcomes = sandbox.map([("pid", None)] * 4)
    assert [o.failure for o in outcomes] == [None] * 4
    assert {o.value for o in outcomes} <= set(sandbox.pids()) and not set(killed) & set(sandbox.pids())


def test_group_that_keeps_timing_out_is_skipped_for_the_call(sandbox):
    _warm(sandbox)
    tasks = [("sleep", 60.0)] * 6 + [("pid", None)] * 2
    start = time.monotonic()
    outcomes = sandbox.map(tasks, groups=["hang"] * 6 + ["fast"] * 2, max_timeouts=2)
    elapsed = time.monotonic() - start
    assert [o.failure for o in outcomes] == ["timeout"] * 2 + ["skipped"] * 4 + [None] * 2
    assert all(o.value == 0.0 and "max_timeouts=2" in o.message for o in outcomes[2:6])
    assert elapsed < TIMEOUT_S + 1.0, f"took {elapsed:.2f} s: the skipped tasks ran"
    # the limit counts per call: one more timeout of the group runs its other tasks
    again = sandbox.map([("sleep", 60.0), ("nap", 0.05), ("nap", 0.05)], groups=["hang"] * 3, max_timeouts=2)
    assert [o.failure for o in again] == ["timeout", None, None]
    with pytest.raises(ValueError, match="one group per task"):
        sandbox.map(tasks, max_timeouts=2)


def test_exception_comes_back_with_traceback(sandbox):
    outcomes = sandbox.map([("raise", "bad sample 7")])
    assert outcomes[0].failure == "exception"
    assert "ValueError: bad sample 7" in outcomes[0].message and "_handler" in outcomes[0].message


def test_startup_failure_raises_with_the_cause():
    box = Sandbox(_bad_setup, SandboxConfig(workers=1, timeout_s=5))
    try:
        with pytest.raises(SandboxError, match="missing model file"):
            box.map([("pid", None)])
    finally:
        box.close()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="workers"):
        SandboxConfig(workers=0)


def test_close_leaves_no_process():
    before = reward_children()
    box = Sandbox(_setup, SandboxConfig(workers=2, timeout_s=30))
    box.map([("pid", None)] * 2)
    pids = box.pids()
    assert set(pids) <= reward_children()
    box.close()
    box.close()  # idempotent
    assert not any(psutil.pid_exists(p) for p in pids)
    assert reward_children() <= before
    with pytest.raises(RuntimeError, match="after close"):
        box.map([("pid", None)])
