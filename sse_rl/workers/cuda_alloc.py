"""The trainer's CUDA caching-allocator mode: expandable segments, except for the buffers it shares over CUDA IPC.

A GRPO train phase runs micro-batches of many sizes (packing leaves a ragged tail; logits scale with the completion
tokens). With the default allocator each size class carves blocks out of fixed segments, and memory freed in one
size class cannot serve another: at 2B that leaves gigabytes reserved but unusable, enough to run out of memory
beside a sleeping engine (`bench/results/grpo_step.md`). Expandable segments map physical pages into one growing
range per stream instead, so freed memory can be reused for any size and `empty_cache` still returns it for the
engines to wake into.

Only the trainer uses them. vLLM's sleep mode allocates from a pool of its own that expandable segments break, so
engines keep the default. The weight-sync buffers an engine maps over CUDA IPC are allocated with plain segments
too (`plain_segments`, used by `sse_rl.weight_sync.cuda_ipc`): torch shares expandable memory by handing file
descriptors between processes (pidfd_getfd, which needs ptrace rights over the trainer that containers often deny),
plain segments by cudaIpc handles. Torch reads the setting whenever it creates a segment, so it can change while
the process runs.

An explicit `expandable_segments` in PYTORCH_CUDA_ALLOC_CONF wins (to measure the default, set it to False).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

KEY = "expandable_segments"


def _env_options() -> list[str]:
    """The allocator options this process started with (torch reads PYTORCH_ALLOC_CONF before the CUDA name)."""
    conf = os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    return [opt.strip() for opt in conf.split(",") if opt.strip()]


def wanted() -> bool:
    """Expandable segments for the trainer, unless the environment sets the option explicitly."""
    for opt in _env_options():
        key, _, value = opt.partition(":")
        if key.strip() == KEY:
            return value.strip().lower() == "true"
    return True


def settings(expandable: bool) -> str:
    """The whole settings string with `expandable` set: torch resets every option missing from the string it is
    given, so the others (max_split_size_mb, ...) are carried over from the environment."""
    others = [opt for opt in _env_options() if opt.partition(":")[0].strip() != KEY]
    return ",".join([*others, f"{KEY}:{expandable}"])


def apply(expandable: bool) -> None:
    """Set this process's allocator mode (the other options as the environment gave them)."""
    with warnings.catch_warnings():  # deprecated in newer torch for an accelerator-generic name; present in both
        warnings.simplefilter("ignore", FutureWarning)
        torch.cuda.memory._set_allocator_settings(settings(expandable))


def use_for_trainer() -> bool:
    """Switch this process's CUDA allocator to the trainer's mode (see the module docstring); returns whether its
    segments are now expandable."""
    expandable = wanted()
    apply(expandable)
    return expandable


@contextmanager
def plain_segments(expandable: bool) -> Iterator[None]:
    """Allocate with plain segments inside the block (buffers shared over CUDA IPC); back to `expandable` after."""
    if not expandable:
        yield
        return
    apply(False)
    try:
        yield
    finally:
        apply(True)
