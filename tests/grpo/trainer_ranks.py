"""Trainer ranks in spawned processes for the multi-rank trainer tests (gloo on CPU): a free port for a group's
rendezvous, and the ranks' pickled results gathered while failing fast when a rank dies."""
from __future__ import annotations

import contextlib
import pickle
import queue as queue_module
import socket
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(procs: list[Any], queue: Any) -> list[Any]:
    """Start `procs` and return the result each puts on `queue` (pickled: the stats' CPU tensors would otherwise be
    shared through descriptors the exiting rank no longer serves); a rank that dies fails the test at once."""
    for p in procs:
        p.start()
    results = []
    try:
        while len(results) < len(procs):
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            assert not failed, f"a trainer rank died (exit codes {failed}); see its traceback above"
            with contextlib.suppress(queue_module.Empty):
                results.append(pickle.loads(queue.get(timeout=2)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return results
