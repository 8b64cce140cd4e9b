"""The SSE mixer as a vLLM recurrent-state layer (`MambaBase`).

Choices:
- One state tensor per layer and request: fp32 `[N+1, H/tp, dk, dv]` (partition 0 shared, K-major as in
  `sse_rl.models.ops`), held in vLLM's hybrid state cache; a slot is a state-cache block id.
- The whole layer (projections, mixing, output norm, out-projection) runs inside one opaque custom op,
  `vllm::sse_h_mixer`: its prefill path needs host-side batch metadata, so torch.compile must not trace it and
  piecewise CUDA graphs split at it (registered in `compat.register_splitting_op`). The decode path is free of
  host syncs, so FULL decode graphs can capture it.
- Decode rows go to `sse_decode` (in place on the cache); prefill rows (new, chunked, resumed from a prefix-cache
  hit) go to `sse_chunk` with per-sequence initial states gathered from the cache (zero for new requests) and the
  final states scattered back.
- Tensor parallelism: heads are sharded (q/k/v, LoRA-B, gate-B, decay-B column-parallel, o_proj row-parallel);
  the router `e_proj` and the low-rank A matrices are replicated, so every rank routes identically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sse_rl.models.ops import sse_chunk, sse_decode
from sse_rl.models.vllm.backend import SSEStateMetadata
from sse_rl.models.vllm.compat import STATE_BACKEND
from torch import nn
from transformers import PretrainedConfig
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

OP_NAME = "sse_h_mixer"


def sse_state_shape(config: PretrainedConfig, tp_size: int) -> tuple[int, int, int, int]:
    """Per-request state of one SSE layer on one TP rank: (N+1, H/tp, dk, dv)."""
    if config.num_heads % tp_size:
        raise ValueError(f"SSE-H needs num_heads ({config.num_heads}) divisible by the tensor-parallel size "
                         f"({tp_size})")
    head_v_dim = int(config.head_dim * config.expand_v)
    return config.num_sparse_partition + 1, config.num_heads // tp_size, config.head_dim, head_v_dim


def _low_rank(pair: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """x -> B(A(x)) for a (replicated A, column-parallel B) pair; vLLM linears return (out, bias)."""
    return pair[1](pair[0](x)[0])[0]


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim, times silu(gate) when given: the HF model's `RMSNorm`/`GatedRMSNorm` numerics
    (fp32 math, rounded to the input dtype after the norm and after the gate)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
        if gate is not None:
            y = (y.float() * F.silu(gate.float())).to(x.dtype)
        return y


class SSEHMixer(nn.Module, MambaBase):
    """SSE layer of SSE-H (spec §1.2–1.3) with parameter names of the HF model (`...attn.<name>`)."""

    def __init__(self, config: PretrainedConfig, *, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        if vllm_config.speculative_config is not None:
            raise NotImplementedError("SSE-H in vLLM does not support speculative decoding; drop the "
                                      "speculative_config / --speculative-config option")
        tp_size = get_tensor_model_parallel_world_size()
        self.prefix = prefix
        self.state_shape = sse_state_shape(config, tp_size)
        _, self.num_heads, self.head_k_dim, self.head_v_dim = self.state_shape
        self.top_k = config.num_writer
        self.gate_logit_normalizer = config.gate_logit_normalizer
        hidden, heads, dk, dv = config.hidden_size, config.num_heads, config.head_dim, self.head_v_dim
        rank = config.gate_low_rank_dim

        self.qkv_proj = MergedColumnParallelLinear(hidden, [heads * dk, heads * dk, heads * dv], bias=False,
                                                   prefix=f"{prefix}.qkv_proj")
        self.lora_q_proj = nn.ModuleList([
            ReplicatedLinear(hidden, dv, bias=False, prefix=f"{prefix}.lora_q_proj.0"),
            ColumnParallelLinear(dv, heads * dk, bias=False, prefix=f"{prefix}.lora_q_proj.1")])
        self.lora_k_proj = nn.ModuleList([
            ReplicatedLinear(hidden, dv, bias=False, prefix=f"{prefix}.lora_k_proj.0"),
            ColumnParallelLinear(dv, heads * dk, bias=False, prefix=f"{prefix}.lora_k_proj.1")])
        self.gk_proj = nn.ModuleList([nn.ModuleList([
            ReplicatedLinear(hidden, rank, bias=False, prefix=f"{prefix}.gk_proj.{i}.0"),
            ColumnParallelLinear(rank, heads * dk, bias=True, prefix=f"{prefix}.gk_proj.{i}.1")]) for i in range(2)])
        self.e_proj = ReplicatedLinear(hidden, config.num_sparse_partition, bias=False, prefix=f"{prefix}.e_proj")
        self.g_proj = nn.ModuleList([
            ReplicatedLinear(hidden, dv, bias=False, prefix=f"{prefix}.g_proj.0"),
            ColumnParallelLinear(dv, heads * dv, bias=False, prefix=f"{prefix}.g_proj.1"),
        ]) if config.use_output_gate else None
        self.o_norm = GatedRMSNorm(dv, eps=config.norm_eps)
        self.o_proj = RowParallelLinear(heads * dv, hidden, bias=False, input_is_parallel=True,
                                        prefix=f"{prefix}.o_proj")

        static_forward_context = vllm_config.compilation_config.static_forward_context
        if prefix in static_forward_context:
            raise ValueError(f"duplicate layer name: {prefix}")
        static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]),)  # replaced by vLLM with the state-cache view when it allocates it

    # MambaBase: the state contract that vLLM's state cache allocates.
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return STATE_BACKEND

    def get_state_shape(self) -> tuple[tuple[int, ...]]:
        return (self.state_shape,)

    def get_state_dtype(self) -> tuple[torch.dtype]:
        return (torch.float32,)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = torch.empty_like(hidden_states)
        torch.ops.vllm.sse_h_mixer(hidden_states, output, self.prefix)
        return output

    def forward_impl(self, hidden_states: torch.Tensor, output: torch.Tensor) -> None:
        """Body of the custom op: features -> SSE mixing on the cached states -> gated norm -> o_proj."""
        metadata = get_forward_context().attn_metadata
        num_tokens = hidden_states.shape[0]
        q_sh, k_sh, q_sp, k_sp, v, g_sh, g_sp, router_logits = self._features(hidden_states)
        o = torch.zeros(num_tokens, self.num_heads, self.head_v_dim, dtype=v.dtype, device=v.device)
        # No metadata during vLLM's memory-profiling run: states are not allocated yet.
        if metadata is not None:
            step = metadata[self.prefix]
            assert isinstance(step, SSEStateMetadata), f"{self.prefix}: unexpected metadata {type(step)}"
            feats = (q_sh, k_sh, q_sp, k_sp, v, g_sh, g_sp, router_logits)
            self._decode(feats, step, o)
            self._prefill(feats, step, o)
        output.copy_(self._output(o, hidden_states))

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Feature maps of spec §1.2 with the HF model's numerics: q = silu, k = softmax over dk (fp32), v = silu,
        log-decays logsigmoid(.) / normalizer in fp32, router logits [T, N]."""
        t, heads = x.shape[0], (self.num_heads, self.head_k_dim)
        qkv, _ = self.qkv_proj(x)
        q1, k1, v = qkv.split([self.num_heads * self.head_k_dim] * 2 + [self.num_heads * self.head_v_dim], dim=-1)
        q2, k2 = q1 + _low_rank(self.lora_q_proj, x), k1 + _low_rank(self.lora_k_proj, x)  # [T, H*dk]
        q_sh, q_sp = F.silu(q1.view(t, *heads)), F.silu(q2.view(t, *heads))  # [T, H, dk]
        k_sh = k1.view(t, *heads).float().softmax(-1).to(x.dtype)
        k_sp = k2.view(t, *heads).float().softmax(-1).to(x.dtype)
        v = F.silu(v.view(t, self.num_heads, self.head_v_dim))  # [T, H, dv]
        g_sh, g_sp = (F.logsigmoid(_low_rank(p, x).view(t, *heads).float()) / self.gate_logit_normalizer
                      for p in self.gk_proj)  # [T, H, dk] fp32
        router_logits, _ = self.e_proj(x)  # [T, N]
        return q_sh, k_sh, q_sp, k_sp, v, g_sh, g_sp, router_logits

    def _decode(self, feats: tuple[torch.Tensor, ...], step: SSEStateMetadata, o: torch.Tensor) -> None:
        """One token per decode row, state updated in place; padded rows (slot -1) give zero output."""
        n = step.num_decode_tokens
        if n == 0:
            return
        state = self.kv_cache[0]  # [num_slots, N+1, H, dk, dv] fp32
        o[:n] = sse_decode(*(f[:n] for f in feats), state, step.decode_slots, top_k=self.top_k)

    def _prefill(self, feats: tuple[torch.Tensor, ...], step: SSEStateMetadata, o: torch.Tensor) -> None:
        """Packed prefill rows through the chunk op, starting from cached (or zero) states, writing final states."""
        if step.num_prefills == 0:
            return
        start, end = step.num_decode_tokens, step.num_decode_tokens + step.num_prefill_tokens
        state = self.kv_cache[0]  # [num_slots, N+1, H, dk, dv] fp32
        slots = step.prefill_slots
        # New requests own recycled slots: never read them (where, not multiply: garbage may be NaN).
        initial = torch.where(step.prefill_has_initial_state[:, None, None, None, None], state[slots], 0.0)
        out, final = sse_chunk(*(f[None, start:end] for f in feats), top_k=self.top_k, initial_state=initial,
                               output_final_state=True, cu_seqlens=step.prefill_cu_seqlens)
        o[start:end] = out[0]
        state[slots] = final

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y = o_proj(RMSNorm_dv(o) [* silu(g)]) per head (spec §1.3 last line)."""
        gate = None if self.g_proj is None else _low_rank(self.g_proj, x).view_as(o)  # [T, H, dv]
        y, _ = self.o_proj(self.o_norm(o, gate).flatten(1))
        return y


def _sse_h_mixer(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    layer: SSEHMixer = get_forward_context().no_compile_layers[layer_name]
    layer.forward_impl(hidden_states, output)


def _sse_h_mixer_fake(hidden_states: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(op_name=OP_NAME, op_func=_sse_h_mixer, mutates_args=["output"],
                          fake_impl=_sse_h_mixer_fake)
