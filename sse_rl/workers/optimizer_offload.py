"""The optimizer's state in host memory between train phases (`train.offload_optimizer`, issue #27).

At 2B the AdamW moments are 16.9 GiB, twice the fp32 weights; kept on a GPU shared with an engine, they take the
memory the engine rolls out in. `OptimizerOffload` moves them to the host after a train phase's last optimizer step
and back at the next phase's start.

Choices:
1) Every state tensor keeps its identity: its storage is emptied (`untyped_storage().resize_(0)`; the local shard of
   a DTensor) and refilled in place, so the optimizer's references and FSDP2's DTensors around the shards stay
   valid, and no optimizer code changes.
2) Host copies live in buffers kept from phase to phase: pinned where the state is on a GPU (asynchronous copies at
   full PCIe speed), plain host memory for CPU state (so CPU trainers run the same path, which the tests check).
   Pinning gigabytes takes seconds, so the trainer reserves the buffers of the state it knows will come (`reserve`)
   before the first step; anything else gets its buffer when it first moves.
3) Back to the device on a side stream, started when the phase starts, so the copy overlaps the first forward and
   backward passes; the optimizer's first read of its state waits for it (`ready`: the compute stream waits, the
   host does not). To the host on the compute stream after the phase's last optimizer step, then one host
   synchronisation before the device storage goes: the engines may take that memory next.
4) The state appears in the optimizer's first step (AdamW creates its moments lazily), and loading a checkpoint may
   replace it: each offload walks the optimizer's current state, and before the first step there is nothing to move.
   A loaded state tensor may not own its storage (the checkpoint file's, which cannot be resized, or a slice of a
   larger tensor): it is replaced by a copy that does, once, before it first moves.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Moved:
    """What one phase's copies moved and took."""

    gib: float  # state moved to the host
    to_host_s: float  # copying it to the host, until done
    to_device_s: float  # copying it back at the phase's start (device time of the side stream's copies on a GPU)


@dataclass
class _Slot:
    """A state tensor whose device storage is released, and where its data is."""

    local: Tensor  # the state tensor (a DTensor's local shard), without storage while on the host
    host: Tensor  # its data
    nbytes: int  # its storage's size on the device


def _local(value: Tensor) -> Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def _owns_storage(t: Tensor) -> bool:
    """`t` is its whole storage, which can be resized: emptying the storage frees exactly `t`'s memory."""
    storage = t.untyped_storage()
    return storage.resizable() and t.is_contiguous() and t.storage_offset() == 0 and \
        storage.nbytes() == t.numel() * t.element_size()


class OptimizerOffload:
    """Moves one optimizer's state tensors to host buffers and back (module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.buffers: dict[tuple[int, str], Tensor] = {}  # (parameter index, state key) -> host buffer
        self.slots: list[_Slot] = []  # the moved tensors while the state is on the host
        self.stream: torch.cuda.Stream | None = None  # the side stream of the copies back (GPU state)
        self.copying: tuple[torch.cuda.Event, torch.cuda.Event] | None = None  # the copies back, on the GPU
        self.to_device_s = 0.0  # the last copy back (CPU state: its wall clock)

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def _state(self) -> Iterator[tuple[tuple[int, str], Tensor]]:
        """((parameter index, key), local tensor) of every tensor in the optimizer's current state, each owning a
        storage that can be resized (choice 4)."""
        for i, param in enumerate(self._params()):
            state = self.optimizer.state.get(param, {})
            for key, value in state.items():
                if isinstance(value, Tensor):
                    if not _owns_storage(_local(value)):
                        state[key] = value = value.clone(memory_format=torch.contiguous_format)
                    yield (i, key), _local(value)

    def _buffer(self, key: tuple[int, str], like: Tensor) -> Tensor:
        """The host buffer of `key`, (re)made when missing or of another shape or dtype."""
        buf = self.buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
            buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
            self.buffers[key] = buf
        return buf

    @torch.no_grad()
    def reserve(self, keys: tuple[str, ...]) -> None:
        """Host buffers for state the optimizer will create: under each of `keys`, one shaped like each parameter
        (its local shard), so the first offload pins nothing."""
        for i, param in enumerate(self._params()):
            for key in keys:
                self._buffer((i, key), _local(param))

    @torch.no_grad()
    def offload(self) -> Moved:
        """Copy every state tensor to its host buffer and release its device storage; returns what moved, with the
        time of the copies back that preceded it (0 where there were none)."""
        assert not self.slots, "offload: the optimizer state is already on the host"
        self.ready()
        to_device_s = self._to_device_seconds()
        t0 = time.perf_counter()
        slots = []
        for key, local in self._state():
            nbytes = local.untyped_storage().nbytes()
            host = self._buffer(key, local)
            host.copy_(local, non_blocking=True)
            slots.append(_Slot(local, host, nbytes))
        if any(slot.local.is_cuda for slot in slots):
            torch.cuda.current_stream().synchronize()  # the host copies are complete before the storage goes
        for slot in slots:
            slot.local.untyped_storage().resize_(0)
        self.slots = slots
        gib = sum(slot.nbytes for slot in slots) / 2**30
        return Moved(gib=gib, to_host_s=time.perf_counter() - t0, to_device_s=to_device_s)

    @torch.no_grad()
    def restore(self) -> None:
        """Give every moved tensor its device storage back (allocated on the compute stream) and start copying its
        data back: on a side stream for GPU state, in place for CPU state. `ready` before the state is read."""
        slots, self.slots = self.slots, []
        self.copying, self.to_device_s = None, 0.0
        if not slots:
            return
        for slot in slots:
            slot.local.untyped_storage().resize_(slot.nbytes)
        if not any(slot.local.is_cuda for slot in slots):
            t0 = time.perf_counter()
            for slot in slots:
                slot.local.copy_(slot.host)
            self.to_device_s = time.perf_counter() - t0
            return
        self.stream = self.stream or torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())  # the new storage is free on the compute stream
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record()
            for slot in slots:
                slot.local.copy_(slot.host, non_blocking=True)
            end.record()
        self.copying = (start, end)

    def ready(self) -> None:
        """The compute stream waits for the copies back, if any are under way (the host does not wait)."""
        if self.copying is not None:
            torch.cuda.current_stream().wait_stream(self.stream)

    def _to_device_seconds(self) -> float:
        """The last copy back's duration: the side stream's time between its events on a GPU (complete by now)."""
        if self.copying is None:
            return self.to_device_s
        start, end = self.copying
        end.synchronize()
        return start.elapsed_time(end) / 1e3
