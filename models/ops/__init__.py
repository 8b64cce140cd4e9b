"""The SSE mixer op. `sse_chunk` / `sse_decode` pick the implementation from the tensors' device: Triton kernels on
CUDA when they are available, the PyTorch reference (`naive.py`) otherwise; both give the same results. Every
implementation has the signature documented here and is called by keyword (docs/sse_layer.md, "The op").
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from sse_rl.models.ops import naive
from sse_rl.models.ops.features import SSEFeatures, sse_features
from sse_rl.models.ops.naive import gla_chunk, sse_aux_loss, sse_chunk_varlen, sse_mask, sse_recurrent, sse_router
import torch
from torch import Tensor


def _triton_impl(x: Tensor, module: str, name: str) -> Callable | None:
    """The Triton implementation `name` of ops/<module>.py for CUDA tensors, else None. Imported on first use, so
    CPU-only installs never import Triton and CPU tests can set TRITON_INTERPRET before the kernels are defined."""
    if not (x.is_cuda and importlib.util.find_spec("triton") is not None):
        return None
    return getattr(importlib.import_module(f"sse_rl.models.ops.{module}"), name)


__all__ = [
    "SSEFeatures", "gla_chunk", "sse_aux_loss", "sse_chunk", "sse_chunk_varlen", "sse_decode", "sse_features",
    "sse_mask", "sse_recurrent", "sse_router",
]


@torch.compiler.disable  # the Triton op stays outside torch.compile graphs (a graph break around it)
def sse_chunk(*, features: SSEFeatures, router_logits: Tensor, top_k: int, scale: float | None = None,
              initial_state: Tensor | None = None, output_final_state: bool = False,
              cu_seqlens: Tensor | None = None, routes: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """SSE over whole sequences, differentiable in every float input.

    Args:
        features: `SSEFeatures`, fields [B, T, H, dk] (v: [B, T, H, dv]); q/k/v of one dtype, the log-decay gates
            of that dtype or fp32.
        router_logits: [B, T, N] e_proj output (softmax and top-K happen inside, in fp32).
        top_k: K, the sparse partitions each token writes and reads.
        scale: multiplies q; default dk ** -0.5.
        initial_state: [S, N+1, H, dk, dv] fp32 or bf16 (`configuration.sse_state_shape` per sequence; computed in
            fp32 either way), or None for zeros.
        output_final_state: whether to return the final states.
        cu_seqlens: [S+1] bounds of sequences packed along T (then B == 1), or None (S = B).
        routes: [B, T, K] integer partitions in [0, N), distinct per token, used instead of the router's top-K
            (routing replay; the weights are then the router's probabilities at these partitions), or None.
    Returns:
        o: [B, T, H, dv] in v's dtype; final_state: [S, N+1, H, dk, dv] in initial_state's dtype (fp32 without
            one) if output_final_state, else None.
    """
    impl = _triton_impl(features.q_shared, "chunk", "sse_triton") or sse_chunk_varlen
    return impl(features=features, router_logits=router_logits, top_k=top_k, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                routes=routes)


@torch.compiler.disable
def sse_decode(*, features: SSEFeatures, router_logits: Tensor, state: Tensor, slot_ids: Tensor, top_k: int,
               scale: float | None = None, out: Tensor | None = None) -> Tensor:
    """One decoding step per sequence on a slot-indexed state cache, updated IN PLACE. No autograd.

    Args:
        features: `SSEFeatures`, fields [B, H, dk] (v: [B, H, dv]): one token per sequence.
        router_logits: [B, N].
        state: [num_slots, N+1, H, dk, dv] fp32 or bf16 (updated in fp32, stored back in its dtype); slots may be
            padded (any stride(0)) but each slot is dense.
        slot_ids: [B] int32/int64 distinct slots; a negative id marks a padded row, which touches no state.
        top_k: K; scale: multiplies q, default dk ** -0.5.
        out: where to write the output (a contiguous tensor of v's shape and dtype), or None for a new tensor.
    Returns:
        o: [B, H, dv] in v's dtype, zero for padded rows (`out` when given).
    """
    impl = _triton_impl(features.q_shared, "decode", "sse_decode_triton") or naive.sse_decode
    return impl(features=features, router_logits=router_logits, state=state, slot_ids=slot_ids, top_k=top_k,
                scale=scale, out=out)
