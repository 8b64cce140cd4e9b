"""Dense Hugging Face Transformers (the teachers that `sse-rl sft` trains and `sse-rl distill` runs) attend over packed
rows through the flash varlen attention of SSE-H's own attention layers (`layers.varlen_attention`).

Why: on a padding-free packed row [1, L] (TRL's collator, no cache) transformers' SDPA path builds a dense
block-diagonal mask [1, 1, L, L] from the position ids (`masking_utils.find_packed_sequence_indices`), and SDPA with
an explicit mask cannot skip masked blocks: every layer computes attention over all L x L token pairs of a row that
holds many short samples, and reads the L x L mask. Registered as an attention implementation (transformers'
`AttentionInterface`, its mask function the flash one, which builds no mask), the varlen kernel attends within each
sequence of the row only. Sequence bounds come from the `cu_seq_lens_q` that TRL's padding-free collator passes,
else from the position ids (one host sync per layer).

The implementation takes only what training on packed rows needs: batch 1, no cache, no padding mask, no
dropout, CUDA in half precision; anything else raises, naming what it got, rather than attend across sequences.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from sse_rl.models.layers import uses_varlen, varlen_attention
from sse_rl.models.modeling import cu_seqlens_from_position_ids
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "sse_rl_varlen"  # the name transformers knows the implementation by (`attn_implementation`)


def varlen_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                             **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention-function contract for one packed row: query [1, H, L, d], key/value [1, Hkv, L, d]
    -> ([1, L, H, d], no attention weights). `scaling` other than d^-0.5 is folded into the query."""
    batch, _, length, head_dim = query.shape
    problems = [what for what, bad in (
        (f"batch {batch} (packed rows are batch 1)", batch != 1),
        (f"a cache ({key.shape[2]} keys for {length} queries)", key.shape[2] != length),
        ("a padding mask", attention_mask is not None), (f"dropout {dropout}", dropout > 0),
        (f"{query.device.type} {query.dtype} without CUDA autocast to half precision", not uses_varlen(query)),
    ) if bad]
    if problems:
        raise NotImplementedError(f"attn_implementation={VARLEN_ATTENTION!r} attends over packed training rows only; "
                                  f"got {', '.join(problems)}: load the model with attn_implementation='sdpa'")
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None and kwargs.get("position_ids") is not None:
        cu_seqlens = cu_seqlens_from_position_ids(kwargs["position_ids"])
    if cu_seqlens is None:  # one sequence
        cu_seqlens = torch.tensor([0, length], device=query.device)
    if scaling is not None and scaling != head_dim ** -0.5:
        query = query * (scaling * head_dim ** 0.5)
    # Under autocast the q/k norms of Qwen3-style models return fp32; flash attention takes one half dtype.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [L, H(kv), d]
    return varlen_attention(q, k, v, cu_seqlens)[None], None


def register() -> None:
    """Make VARLEN_ATTENTION known to transformers (idempotent)."""
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, flash_attention_mask)


def use_varlen_attention(model: PreTrainedModel, half_precision: bool) -> bool:
    """Switch a dense HF Transformer that will train (or run without gradients) on packed rows to VARLEN_ATTENTION
    when this machine has CUDA and the run computes in half precision; SSE-H (whose attention layers take the
    varlen path by themselves) and CPU or fp32 runs keep their implementation. Returns whether it switched."""
    if model.config.model_type == "sse_h" or not (half_precision and torch.cuda.is_available()):
        return False
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(VARLEN_ATTENTION)
    logger.info("%s: packed rows attend through flash varlen attention (%s, was %s)", type(model).__name__,
                VARLEN_ATTENTION, previous)
    return True
