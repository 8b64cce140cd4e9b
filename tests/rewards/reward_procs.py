"""Child processes of the test process, minus multiprocessing's own per-process helpers (shared, not ours)."""
from multiprocessing import forkserver, resource_tracker

import psutil


def reward_children() -> set[int]:
    helpers = {resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid}
    return {p.pid for p in psutil.Process().children(recursive=True)} - helpers
