"""Weights as a few flat buffers, for the transports that move raw memory rather than named tensors.

CUDA IPC (an engine maps a trainer rank's buffers) and the collective transport (trainer rank 0 broadcasts the
buffers to every engine) both use it. One buffer per dtype keeps the number of transfers (and IPC handles) at one or
two for the whole model.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from sse_rl import rendezvous

# (HF name, shape, element offset) of each tensor in a buffer
Entries = list[tuple[str, tuple[int, ...], int]]
# per buffer: its dtype, its entries and its total number of elements
Layout = list[tuple[torch.dtype, Entries, int]]


def layout(state: dict[str, Tensor], dtype: torch.dtype) -> Layout:
    """How `state` packs: per buffer dtype (floating tensors cast to `dtype`), its entries and total elements."""
    groups: dict[torch.dtype, Entries] = {}
    sizes: dict[torch.dtype, int] = {}
    for name, t in state.items():
        dt = dtype if t.is_floating_point() else t.dtype
        groups.setdefault(dt, []).append((name, tuple(t.shape), sizes.get(dt, 0)))
        sizes[dt] = sizes.get(dt, 0) + t.numel()
    return [(dt, entries, sizes[dt]) for dt, entries in groups.items()]


def pack(state: dict[str, Tensor], dtype: torch.dtype, device: torch.device) -> list[tuple[Tensor, Entries]]:
    """Copy `state` into flat buffers on `device` following `layout`."""
    out = []
    for dt, entries, total in layout(state, dtype):
        flat = torch.empty(total, dtype=dt, device=device)  # [P]
        for name, shape, offset in entries:
            flat[offset:offset + math.prod(shape)].copy_(state[name].reshape(-1))
        out.append((flat, entries))
    return out


def unpack(flat: Tensor, entries: Entries) -> dict[str, Tensor]:
    """Views of a flat buffer as the named tensors it holds (no copy)."""
    return {name: flat[offset:offset + math.prod(shape)].view(shape) for name, shape, offset in entries}


def join_group(host: str, port: int, rank: int, world_size: int, device: torch.device,
               secret: str) -> dist.ProcessGroup:
    """A process group of trainer rank 0 (rank 0, hosting the store) and the engines (ranks 1..), separate from the
    trainers' default group and from vLLM's own: NCCL for CUDA tensors, gloo otherwise. The store listens on `host`
    alone and keeps its keys under `secret` (`sse_rl.rendezvous`)."""
    store = rendezvous.open_store(host, port, rank, world_size, secret)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size)
