"""Reward worker processes as tests see them: children of the test process (minus multiprocessing's shared
per-process helpers), and a kill that waits until the process is gone."""
import os
import signal
import time
from multiprocessing import forkserver, resource_tracker

import psutil


def reward_children() -> set[int]:
    helpers = {resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid}
    return {p.pid for p in psutil.Process().children(recursive=True)} - helpers


def kill_and_wait(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL `pid` (as the OOM killer or an operator would) and return once it no longer exists."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid):
        assert time.monotonic() < deadline, f"process {pid} still exists {timeout_s} s after SIGKILL"
        time.sleep(0.01)
