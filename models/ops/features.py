"""The SSE op's inputs: `SSEFeatures` and `sse_features`, the feature maps that make them (docs/sse_layer.md,
"Feature maps").

The HF layer (`layers.SSEMixer`) and the vLLM layer (`vllm.sse_layer.SSEHMixer`) compute the projections of x their
own way (separate `nn.Linear`s; stacked, tensor-parallel matmuls) and both hand them to `sse_features`, so the two
feed the op the same features from the same weights.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from sse_rl.models.configuration import sse_state_shape
from torch import Tensor


class SSEFeatures(NamedTuple):
    """Feature-mapped inputs of the SSE op, per token and head. `...` is [B, T] for whole sequences (`sse_chunk`),
    [B] for one decoding step (`sse_decode`). The field names are the ones the ops document."""

    q_shared: Tensor  # [..., H, dk] silu(x W_q): the query of the shared partition
    k_shared: Tensor  # [..., H, dk] softmax over dk of x W_k
    q_sparse: Tensor  # [..., H, dk] silu(x W_q + LoRA_q(x)): the query of the sparse partitions
    k_sparse: Tensor  # [..., H, dk] softmax over dk of x W_k + LoRA_k(x)
    v: Tensor  # [..., H, dv] silu(x W_v), written to every partition the token selects
    g_shared: Tensor  # [..., H, dk] log-decay (<= 0) of the shared partition
    g_sparse: Tensor  # [..., H, dk] log-decay (<= 0) of the sparse partitions the token selects

    def map(self, fn: Callable[[Tensor], Tensor]) -> SSEFeatures:
        """`fn` applied to every feature (a row selection, a new batch dim)."""
        return SSEFeatures(*[fn(x) for x in self])

    def state_shape(self, num_sparse_partition: int) -> tuple[int, int, int, int]:
        """The per-sequence recurrent state these features update (`configuration.sse_state_shape`)."""
        heads, head_k_dim = self.q_shared.shape[-2:]
        return sse_state_shape(num_sparse_partition, heads, head_k_dim, self.v.shape[-1])


def sse_features(*, q: Tensor, k: Tensor, q_lora: Tensor, k_lora: Tensor, v: Tensor, gate_shared: Tensor,
                 gate_sparse: Tensor, num_heads: int, gate_logit_normalizer: float) -> SSEFeatures:
    """Feature maps of fla's `SSEGLA`: q = silu, k = softmax over dk (in fp32, rounded back to the projections'
    dtype), v = silu, log-decays logsigmoid(.) / normalizer kept in fp32.

    Args:
        q, k: [..., H*dk] the projections x W_q, x W_k; q_lora, k_lora: [..., H*dk] the sparse branch's low-rank
            additions LoRA_q(x), LoRA_k(x); v: [..., H*dv] x W_v;
        gate_shared, gate_sparse: [..., H*dk] decay-gate logits of the shared and the sparse partitions;
        num_heads: H (of this tensor-parallel rank); gate_logit_normalizer: divides the log-decays (16 in fla).
    Returns:
        SSEFeatures with [..., H, dk] / [..., H, dv] fields; the gates fp32, the rest in q's dtype.
    """
    heads = (num_heads, -1)
    q_sparse, k_sparse = q + q_lora, k + k_lora
    return SSEFeatures(
        q_shared=F.silu(q.unflatten(-1, heads)),
        k_shared=k.unflatten(-1, heads).float().softmax(-1).to(q.dtype),
        q_sparse=F.silu(q_sparse.unflatten(-1, heads)),
        k_sparse=k_sparse.unflatten(-1, heads).float().softmax(-1).to(q.dtype),
        v=F.silu(v.unflatten(-1, heads)),
        g_shared=F.logsigmoid(gate_shared.unflatten(-1, heads).float()) / gate_logit_normalizer,
        g_sparse=F.logsigmoid(gate_sparse.unflatten(-1, heads).float()) / gate_logit_normalizer,
    )
