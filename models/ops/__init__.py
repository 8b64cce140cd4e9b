"""The SSE mixer op. `sse_chunk` / `sse_decode` pick the implementation from the tensors' device: Triton kernels on
CUDA when they are available, the PyTorch reference (`naive.py`) otherwise; both give the same results."""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from sse_rl.models.ops.naive import (
    gla_chunk,
    sse_aux_loss,
    sse_chunk_varlen,
    sse_mask,
    sse_recurrent,
    sse_router,
)
from sse_rl.models.ops.naive import (
    sse_decode as sse_decode_reference,
)
import torch
from torch import Tensor


def _triton_impl(x: Tensor, module: str, name: str) -> Callable | None:
    """The Triton implementation `name` of ops/<module>.py for CUDA tensors, else None. Imported on first use, so
    CPU-only installs never import Triton and CPU tests can set TRITON_INTERPRET before the kernels are defined."""
    if not (x.is_cuda and importlib.util.find_spec("triton") is not None):
        return None
    return getattr(importlib.import_module(f"sse_rl.models.ops.{module}"), name)


__all__ = [
    "gla_chunk", "sse_aux_loss", "sse_chunk", "sse_chunk_varlen", "sse_decode", "sse_decode_reference", "sse_mask",
    "sse_recurrent", "sse_router",
]


@torch.compiler.disable  # the Triton op stays outside torch.compile graphs (a graph break around it)
def sse_chunk(q_shared: Tensor, k_shared: Tensor, q_sparse: Tensor, k_sparse: Tensor, v: Tensor, g_shared: Tensor,
              g_sparse: Tensor, router_logits: Tensor, *, top_k: int, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """SSE over whole sequences; arguments and shapes as in `naive.sse_chunk_varlen`."""
    impl = _triton_impl(q_shared, "chunk", "sse_triton") or sse_chunk_varlen
    return impl(q_shared, k_shared, q_sparse, k_sparse, v, g_shared, g_sparse, router_logits, top_k=top_k,
                scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens)


@torch.compiler.disable
def sse_decode(q_shared: Tensor, k_shared: Tensor, q_sparse: Tensor, k_sparse: Tensor, v: Tensor, g_shared: Tensor,
               g_sparse: Tensor, router_logits: Tensor, state: Tensor, slot_ids: Tensor, *, top_k: int,
               scale: float | None = None, out: Tensor | None = None) -> Tensor:
    """One decoding step on a slot-indexed state, in place; arguments and shapes as in `naive.sse_decode`. The
    output is written into `out` when given (a contiguous tensor of v's shape and dtype) and returned."""
    triton_impl = _triton_impl(q_shared, "decode", "sse_decode_triton")
    args = (q_shared, k_shared, q_sparse, k_sparse, v, g_shared, g_sparse, router_logits, state, slot_ids)
    if triton_impl is not None:
        return triton_impl(*args, top_k=top_k, scale=scale, out=out)
    o = sse_decode_reference(*args, top_k=top_k, scale=scale)
    return o if out is None else out.copy_(o)
