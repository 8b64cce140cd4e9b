"""SSE-H building blocks: the SSE mixer, RoPE attention, the SwiGLU MLP and RMS norms.

Module and parameter names follow fla (`fla/layers/sse.py::SSEGLA`, `fla/layers/attn.py::Attention`,
`fla/modules::GatedMLP`) so the authors' checkpoints load by name. Layers take explicit arguments, never the
HF config; `modeling.py` maps the config onto them. Cache access goes through transformers' `Cache`: the SSE
mixer keeps its state (`configuration.sse_state_shape` per sequence, fp32) as the linear-attention "recurrent
state" of its layer, the attention layer its K/V. The vLLM plugin's SSE layer reuses `GatedRMSNorm` from here.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sse_rl.models.configuration import SSE_STATE_DTYPE, sse_state_shape
from sse_rl.models.ops import SSEFeatures, sse_aux_loss, sse_chunk, sse_decode, sse_features, sse_router
from torch import Tensor, nn
from transformers.cache_utils import Cache


# A routes entry the engine did not record (prompt tokens served from its prefix cache, a sequence's last token): the
# SSE layer keeps its own choice there. Recorded routes are uint8, so this needs N < 255 partitions.
NO_ROUTE = 255


def route_dtype(num_partitions: int) -> torch.dtype:
    """The dtype recorded and returned routes use: uint8 while N < NO_ROUTE (1 byte per token, layer and k)."""
    return torch.uint8 if num_partitions < NO_ROUTE else torch.int16


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """`RMSNorm(x) * silu(gate)` (fla `FusedRMSNormGated`, swish activation, norm before gate), rounded to the input
    dtype after the norm and after the gate; plain `RMSNorm(x)` without a gate (an SSE layer without output gate)."""

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:  # type: ignore[override]
        y = super().forward(x)
        return y if gate is None else (y.float() * F.silu(gate.float())).to(x.dtype)


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def low_rank(in_dim: int, rank: int, out_dim: int, bias: bool = False) -> nn.Sequential:
    """Linear(in, rank) -> Linear(rank, out): fla's low-rank projections (LoRA on q/k, gates)."""
    return nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim, bias=bias))


class SSEMixer(nn.Module):
    """Sparse State Expansion (GLA form) token mixer, fla `SSEGLA` with use_short_conv=False (docs/sse_layer.md).

    A shared always-on partition reads q = silu(x W_q), k = softmax(x W_k); the router e = softmax(x W_e) picks K of
    N sparse partitions per token, which read q = silu(x W_q + LoRA_q(x)), k = softmax(x W_k + LoRA_k(x)) scaled by
    the router weight. Values silu(x W_v) are shared; log-decays are logsigmoid(low-rank(x)) / normalizer.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, expand_v: float, num_sparse_partition: int,
                 top_k: int, use_output_gate: bool = True, gate_low_rank_dim: int = 16,
                 gate_logit_normalizer: int = 16, norm_eps: float = 1e-6, layer_idx: int = 0) -> None:
        super().__init__()
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, int(head_dim * expand_v)
        self.num_sparse_partition, self.top_k = num_sparse_partition, top_k
        self.gate_logit_normalizer, self.layer_idx = gate_logit_normalizer, layer_idx
        self.state_shape = sse_state_shape(num_sparse_partition, num_heads, head_dim, self.head_v_dim)
        key_dim, value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.lora_q_proj = low_rank(hidden_size, self.head_v_dim, key_dim)
        self.lora_k_proj = low_rank(hidden_size, self.head_v_dim, key_dim)
        # [0]: decay of the shared partition, [1]: decay of the sparse partitions.
        self.gk_proj = nn.ModuleList([low_rank(hidden_size, gate_low_rank_dim, key_dim, bias=True) for _ in range(2)])
        self.e_proj = nn.Linear(hidden_size, num_sparse_partition, bias=False)
        self.g_proj = low_rank(hidden_size, self.head_v_dim, value_dim) if use_output_gate else None
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def forward(self, x: Tensor, token_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                past_key_values: Cache | None = None, routes: Tensor | None = None,
                output_routes: bool = False) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """x: [B, T, D]; token_mask: [B, T] bool (False = padding, which then neither writes nor decays any state);
        cu_seqlens: [S+1] for packed sequences (B = 1); routes: [B, T, K] integer partitions to use instead of the
        router's top-K (routing replay: the weights stay the router's probabilities at them, so the router keeps
        learning; a token with an entry NO_ROUTE keeps the router's own choice). Returns the output [B, T, D] and
        this layer's aux loss, and with output_routes the partitions used [B, T, K] int64."""
        features = self._features(x)
        logits = self.e_proj(x)  # [B, T, N]
        if token_mask is not None:
            keep = token_mask[..., None, None].to(x.dtype)  # [B, T, 1, 1]
            features = features._replace(k_shared=features.k_shared * keep, k_sparse=features.k_sparse * keep,
                                         g_shared=features.g_shared * keep, g_sparse=features.g_sparse * keep)
        if routes is not None:
            routes = self._replayed(logits, routes)  # [B, T, K] int64
        o = self._mix(features, logits, cu_seqlens, past_key_values, routes)  # [B, T, H, dv]
        gate = None if self.g_proj is None else self.g_proj(x).unflatten(-1, (self.num_heads, self.head_v_dim))
        o = self.o_norm(o, gate)
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training:
            probs, _, indices = sse_router(logits, top_k=self.top_k, routes=routes)
            aux = sse_aux_loss(probs, indices, token_mask)
        y = self.o_proj(o.flatten(-2))
        if not output_routes:
            return y, aux
        return y, aux, routes if routes is not None else sse_router(logits.detach(), top_k=self.top_k)[2]

    def _replayed(self, logits: Tensor, routes: Tensor) -> Tensor:
        """The partitions [B, T, K] int64 to replay: `routes`, with the router's own top-K for tokens the engine did
        not record (an entry NO_ROUTE). No host sync: the own choice is computed for every token and selected."""
        routes = routes.to(device=logits.device, dtype=torch.long)
        own = sse_router(logits.detach(), top_k=self.top_k)[2]  # [B, T, K]
        return torch.where((routes == NO_ROUTE).any(-1, keepdim=True), own, routes)

    def _features(self, x: Tensor) -> SSEFeatures:
        """The op's features of x [B, T, D]: fields [B, T, H, dk] / [B, T, H, dv]."""
        return sse_features(q=self.q_proj(x), k=self.k_proj(x), q_lora=self.lora_q_proj(x), k_lora=self.lora_k_proj(x),
                            v=self.v_proj(x), gate_shared=self.gk_proj[0](x), gate_sparse=self.gk_proj[1](x),
                            num_heads=self.num_heads, gate_logit_normalizer=self.gate_logit_normalizer)

    def _mix(self, features: SSEFeatures, logits: Tensor, cu_seqlens: Tensor | None, cache: Cache | None,
             routes: Tensor | None) -> Tensor:
        """Run the SSE op, continuing from and writing back to the cache's state when there is a cache. Forced routes
        go through the chunk op (the decode op routes inside its kernel), also for one cached step."""
        layer = cache.layers[self.layer_idx] if cache is not None else None
        state = layer.recurrent_states[0] if layer is not None and layer.is_recurrent_states_initialized[0] else None
        batch, length = features.v.shape[:2]
        if state is not None:
            assert state.shape[1:] == self.state_shape, f"cached SSE state {tuple(state.shape)} != {self.state_shape}"
        if state is not None and length == 1 and routes is None:
            slots = torch.arange(batch, device=features.v.device)
            o = sse_decode(features=features.map(lambda f: f[:, 0]), router_logits=logits[:, 0], state=state,
                           slot_ids=slots, top_k=self.top_k)  # [B, H, dv]; state updated in place
            return o[:, None]
        o, final = sse_chunk(features=features, router_logits=logits, top_k=self.top_k, initial_state=state,
                             output_final_state=cache is not None, cu_seqlens=cu_seqlens, routes=routes)
        if cache is not None:
            cache.update_recurrent_state(final.to(SSE_STATE_DTYPE), self.layer_idx)
        return o


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, rotate-half (GPT-NeoX) layout. Plain RoPE recomputes its frequencies in fp32 on
    each call (no buffer), so they never depend on the dtype or device the model was loaded with; a scaled RoPE
    (`scaling`: transformers' rope_parameters without rope_theta) takes its frequencies and cos/sin factor from
    transformers' own RoPE functions, so a converted model rotates exactly as its teacher did."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int = 4096) -> None:
        super().__init__()
        self.head_dim, self.theta, self.max_position_embeddings = head_dim, theta, max_position_embeddings
        self.scaling = scaling if scaling and scaling.get("rope_type", "default") != "default" else None
        self._scaled: tuple[Tensor, float] | None = None  # built on first use: models are built on the meta device

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        """x: [B, T, H, d]; position_ids: [B, T]."""
        factor = 1.0
        if self.scaling is None:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=x.device) / self.head_dim
            angles = position_ids[..., None].float() / self.theta ** exponents  # [B, T, d/2]
        else:
            if self._scaled is None:
                self._scaled = scaled_rope_frequencies(self.head_dim, self.theta, self.scaling,
                                                       self.max_position_embeddings)
            inv_freq, factor = self._scaled
            angles = position_ids[..., None].float() * inv_freq.to(x.device)  # [B, T, d/2]
        angles = torch.cat([angles, angles], dim=-1)[:, :, None]  # [B, T, 1, d]
        xf = x.float()
        cos, sin = angles.cos() * factor, angles.sin() * factor
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def scaled_rope_frequencies(head_dim: int, theta: float, scaling: dict[str, Any],
                            max_position_embeddings: int) -> tuple[Tensor, float]:
    """Inverse frequencies [d/2] (fp32) and cos/sin factor of a scaled RoPE, from transformers' RoPE functions
    (they read a config; a Llama config carries the head dim, theta and scaling to them)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, head_dim=head_dim,
                         max_position_embeddings=max_position_embeddings,
                         rope_parameters={**scaling, "rope_theta": theta})
    inv_freq, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, torch.device("cpu"))
    return inv_freq.float(), float(factor)


def uses_varlen(x: Tensor) -> bool:
    """Whether packed attention on `x` runs as flash varlen attention: CUDA in half precision (x's dtype, or
    autocast's); otherwise SDPA with a block-diagonal mask."""
    half = (torch.float16, torch.bfloat16)
    return x.is_cuda and (x.dtype in half or (torch.is_autocast_enabled("cuda")
                                              and torch.get_autocast_dtype("cuda") in half))


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Causal flash attention over packed sequences (`uses_varlen` inputs) at scale d^-0.5: q [L, H, d], k/v
    [L, Hkv, d], cu_seqlens [S+1] -> [L, H, d]. The total length bounds every sequence's length (no host sync to
    find the longest). SSE-H's attention layers and dense HF Transformers (`hf_attention`) both attend through it."""
    from torch.nn.attention.varlen import varlen_attn

    heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads != heads:  # torch 2.11's varlen_attn has no GQA
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
    cu, length = cu_seqlens.to(device=q.device, dtype=torch.int32), q.shape[0]
    return varlen_attn(q, k, v, cu, cu, length, length, window_size=(-1, 0))


class Attention(nn.Module):
    """Causal softmax attention (MHA/GQA) with RoPE, via SDPA; the KV cache is a transformers `Cache` layer.
    Options cover the Transformers that `hybridize.py` converts: q/k/v bias (Qwen2), o bias (Llama's
    attention_bias), per-head RMSNorm of q and k before RoPE (Qwen3), scaled RoPE (Llama 3)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float,
                 layer_idx: int = 0, qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rope_scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int = 4096) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.layer_idx = num_heads, num_kv_heads, head_dim, layer_idx
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.rotary = RotaryEmbedding(head_dim, rope_theta, rope_scaling, max_position_embeddings)

    def forward(self, x: Tensor, position_ids: Tensor, attn_mask: Tensor | None = None,
                past_key_values: Cache | None = None, cu_seqlens: Tensor | None = None) -> Tensor:
        """x: [B, T, D]; position_ids: [B, T]; attn_mask: [B, 1, T, T_past + T] bool (True = attend), or None for
        plain causal attention over the new tokens and everything cached before them. Packed sequences
        (`cu_seqlens`, B = 1, no cache) go through flash varlen attention where `uses_varlen`, with no mask."""
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)))  # [B, T, H, d]
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)))  # [B, T, Hkv, d]
        q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        if cu_seqlens is not None and uses_varlen(x):
            return self.o_proj(varlen_attention(q[0], k[0], v[0], cu_seqlens).flatten(-2)[None])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)  # [B, Hkv, T_past + T, d]
        q_len, k_len = q.shape[2], k.shape[2]
        if attn_mask is None and 1 < q_len < k_len:
            attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=x.device).tril(k_len - q_len)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and q_len > 1,
                                           enable_gqa=self.num_heads != self.num_kv_heads)  # [B, H, T, d]
        return self.o_proj(o.transpose(1, 2).flatten(-2))
