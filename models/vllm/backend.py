"""vLLM attention backend for the SSE state: batch metadata only (the layer runs the math).

Why our own backend rather than reusing vLLM's GDN one: the GDN builder's decode/prefill classification differs
between the supported releases (0.26 treats every one-token row as a decode, so a new one-token prompt would decode
from a recycled state slot; 0.32 reclassifies such rows), and it builds FLA chunk metadata the SSE ops do not use.

Choices:
- Rows are reordered decodes-first by vLLM (`reorder_batch_threshold = 1`). The leading rows that extend a sequence
  by one token with state already in the cache go to the decode kernel; every later row (new prompt, chunk of a
  long prompt, prompt resumed from a prefix-cache hit) goes to the chunk kernel with `has_initial_state` = "tokens
  were already computed for this request". State slots of new requests are never read.
- Slots come from `mamba_get_block_table_tensor`, so vLLM's prefix-cache modes ("none", "align") work unchanged:
  in "align" mode the runner copies states between blocks before the step; the layer reads and writes one slot.
- FULL CUDA graphs (uniform one-token decode batches): decode slots live in a persistent buffer whose padded rows
  hold `PAD_SLOT_ID` (-1), which the decode op skips.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sse_rl.models.vllm.compat import host_seq_lens
from vllm.config import VllmConfig
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.utils import PAD_SLOT_ID, mamba_get_block_table_tensor
from vllm.v1.kv_cache_interface import MambaSpec


@dataclass
class SSEStateMetadata:
    """Per-step batch layout seen by every SSE layer (tokens: decode rows first, then prefill rows)."""

    num_decodes: int                    # real decode rows (one token each)
    num_decode_tokens: int              # decode rows incl. CUDA-graph padding == len(decode_slots)
    num_prefills: int                   # rows for the chunk kernel
    num_prefill_tokens: int
    decode_slots: torch.Tensor          # [num_decode_tokens] int32 state slot per decode row, -1 = padding
    prefill_slots: torch.Tensor         # [num_prefills] int64
    prefill_cu_seqlens: torch.Tensor    # [num_prefills + 1] int64, offsets from the first prefill token
    prefill_has_initial_state: torch.Tensor  # [num_prefills] bool


class SSEStateBackend(AttentionBackend):
    """Metadata-only backend (`is_ssm`): vLLM allocates state pages and builds `SSEStateMetadata` per step."""

    @staticmethod
    def get_name() -> str:
        return "SSE_STATE"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the SSE state backend has no attention impl; the SSE layer runs the kernels")

    @staticmethod
    def get_builder_cls() -> type[SSEStateMetadataBuilder]:
        return SSEStateMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


def split_rows(query_lens: torch.Tensor, computed: torch.Tensor) -> tuple[int, int]:
    """(num_decodes, num_prefills) of a decodes-first batch, from host tensors [num_reqs].

    Decodes: the leading rows that append one token to a sequence whose state is cached (`computed` > 0). A new
    one-token prompt is not a decode: its slot holds a recycled state. Prefills: every later row up to the last one
    with tokens (trailing zero-length rows are CUDA-graph padding).
    """
    is_decode = (query_lens == 1) & (computed > 0)  # [num_reqs] bool
    not_decode = (~is_decode).nonzero()
    num_decodes = int(not_decode[0]) if len(not_decode) else len(is_decode)
    has_tokens = (query_lens[num_decodes:] > 0).nonzero()
    num_prefills = int(has_tokens[-1]) + 1 if len(has_tokens) else 0
    return num_decodes, num_prefills


class SSEStateMetadataBuilder(AttentionMetadataBuilder[SSEStateMetadata]):
    kv_cache_spec: MambaSpec
    reorder_batch_threshold: int = 1
    _cudagraph_support = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec: MambaSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        compilation = vllm_config.compilation_config
        self.use_full_cuda_graph = compilation.cudagraph_mode.has_full_cudagraphs()
        max_graph_batch = vllm_config.scheduler_config.max_num_seqs
        if compilation.max_cudagraph_capture_size is not None:
            max_graph_batch = min(max_graph_batch, compilation.max_cudagraph_capture_size)
        # Persistent so that a captured decode graph reads this step's slots at replay.
        self.graph_decode_slots = torch.full((max_graph_batch,), PAD_SLOT_ID, dtype=torch.int32, device=device)

    def _slots(self, m: CommonAttentionMetadata) -> torch.Tensor:
        table = mamba_get_block_table_tensor(m.block_table_tensor, m.seq_lens, self.kv_cache_spec,
                                             self.vllm_config.cache_config.mamba_cache_mode)
        return table[: m.num_reqs, 0]  # [num_reqs] int32

    def _graph_slots(self, slots: torch.Tensor, num_rows: int) -> torch.Tensor:
        """Copy `slots` into the persistent buffer, PAD_SLOT_ID after them, and return its first `num_rows` rows.

        The whole tail is padded, not only up to `num_rows`: a replayed graph reads as many rows as it was
        captured with, and stale slots there would be decoded into other requests' states.
        """
        self.graph_decode_slots[: len(slots)].copy_(slots, non_blocking=True)
        self.graph_decode_slots[len(slots):].fill_(PAD_SLOT_ID)
        return self.graph_decode_slots[:num_rows]

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SSEStateMetadata:
        m = common_attn_metadata
        slots = self._slots(m)
        query_start_cpu = m.query_start_loc_cpu[: m.num_reqs + 1]
        query_lens = query_start_cpu.diff()  # [num_reqs] host
        computed = host_seq_lens(m) - query_lens  # tokens already in the cache, per row
        num_decodes, num_prefills = split_rows(query_lens, computed)
        end = num_decodes + num_prefills
        num_prefill_tokens = int(query_start_cpu[end] - query_start_cpu[num_decodes])

        decode_slots = slots[:num_decodes]
        if num_prefills == 0 and self.use_full_cuda_graph and m.num_reqs <= len(self.graph_decode_slots):
            decode_slots = self._graph_slots(decode_slots, m.num_reqs)
        query_start = m.query_start_loc[num_decodes: end + 1]
        return SSEStateMetadata(
            num_decodes=num_decodes,
            num_decode_tokens=len(decode_slots),
            num_prefills=num_prefills,
            num_prefill_tokens=num_prefill_tokens,
            decode_slots=decode_slots,
            prefill_slots=slots[num_decodes:end].long(),
            prefill_cu_seqlens=(query_start - query_start[0]).long(),
            prefill_has_initial_state=(computed[num_decodes:end] > 0).to(self.device, non_blocking=True),
        )

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> SSEStateMetadata:
        """Capture batches are uniform one-token decodes (their lengths are dummies, so nothing is classified)."""
        m = common_attn_metadata
        if m.num_reqs > len(self.graph_decode_slots) or m.num_actual_tokens != m.num_reqs:
            raise ValueError(f"SSE-H captures FULL CUDA graphs for one-token decode batches of at most "
                             f"{len(self.graph_decode_slots)} rows, got {m.num_reqs} rows / "
                             f"{m.num_actual_tokens} tokens; use cudagraph_mode FULL_DECODE_ONLY or "
                             "FULL_AND_PIECEWISE with capture sizes <= max_num_seqs")
        decode_slots = self._graph_slots(self._slots(m), m.num_reqs)
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        return SSEStateMetadata(
            num_decodes=m.num_reqs, num_decode_tokens=m.num_reqs, num_prefills=0, num_prefill_tokens=0,
            decode_slots=decode_slots, prefill_slots=empty, prefill_cu_seqlens=empty[:1],
            prefill_has_initial_state=empty.bool())
