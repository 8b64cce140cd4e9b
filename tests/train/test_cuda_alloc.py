"""The trainer's allocator mode (sse_rl.workers.cuda_alloc): expandable segments, plain ones for IPC buffers."""
from __future__ import annotations

import pytest
import torch

from sse_rl.workers import cuda_alloc


@pytest.mark.parametrize("env, wanted, on", [
    ({}, True, "expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}, True, "max_split_size_mb:512,expandable_segments:True"),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False, garbage_collection_threshold:0.8"}, False,
     "garbage_collection_threshold:0.8,expandable_segments:True"),
    # torch reads PYTORCH_ALLOC_CONF first, and so does the trainer
    ({"PYTORCH_ALLOC_CONF": "expandable_segments:false", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
     False, "expandable_segments:True"),
])
def test_settings_keep_the_users_other_options(monkeypatch, env, wanted, on):
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cuda_alloc.wanted() is wanted
    assert cuda_alloc.settings(True) == on
    assert cuda_alloc.settings(False) == on.replace("expandable_segments:True", "expandable_segments:False")


def _segment(t: torch.Tensor) -> dict:
    ptr = t.data_ptr()
    return next(s for s in torch.cuda.memory_snapshot() if s["address"] <= ptr < s["address"] + s["total_size"])


@pytest.mark.gpu  # the CUDA caching allocator
def test_trainer_memory_expands_and_shared_buffers_stay_plain(monkeypatch):
    from torch.multiprocessing.reductions import reduce_tensor

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    try:
        assert cuda_alloc.use_for_trainer()
        work = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        with cuda_alloc.plain_segments(True):
            shared = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        after = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        assert _segment(work)["is_expandable"] and _segment(after)["is_expandable"]
        assert not _segment(shared)["is_expandable"]
        reduce_tensor(shared)  # a cudaIpc handle of a plain segment
    finally:  # the rest of the session allocates as torch does by default
        cuda_alloc.apply(False)
