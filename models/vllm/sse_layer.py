"""The SSE mixer as a vLLM recurrent-state layer (`MambaBase`).

Choices:
- One state tensor per layer and request: `SSEHConfig.sse_state_shape(tp_size)` (`[N+1, H/tp, dk, dv]`, as the ops
  and the HF cache hold it), in vLLM's hybrid state cache; a slot is a state-cache block id. Its dtype follows vLLM's
  `mamba_ssm_cache_dtype` (`sse_state_dtype`): fp32 by default, as training keeps it, or bf16 (issue #27: half the
  state bytes per decode step; the ops still compute in fp32 and round on store).
- Three parts, as vLLM's own linear-attention layers: projections and feature maps (`ops.sse_features`, shared
  with the HF layer), then the state mixing as one opaque custom op (`vllm::sse_h_mix`), then the gated norm
  (`layers.GatedRMSNorm`, shared with the HF layer) and out-projection. torch.compile sees the first and last
  parts, so their elementwise ops fuse into a few kernels; the op reads host-side batch metadata (prefill/decode
  split), so it stays opaque and piecewise CUDA graphs split at it (`compat.register_splitting_op`). Its decode
  path is free of host syncs, so FULL decode graphs capture it.
- The projections of x that are replicated over TP (the low-rank "A" halves of the q/k LoRAs and gates, and the
  router `e_proj`) are stacked into one matmul, `x_proj`; `model.stacked_target` maps the HF names onto it.
- Decode rows go to `sse_decode` (in place on the cache); prefill rows (new, chunked, resumed from a prefix-cache
  hit) go to `sse_chunk` with per-sequence initial states gathered from the cache (zero for new requests) and the
  final states scattered back.
- Tensor parallelism: heads are sharded (q/k/v, LoRA-B, gate-B, decay-B column-parallel, o_proj row-parallel);
  `x_proj` is replicated, so every rank routes identically.
- Route recording (issue #28, off by default): with `record_routes` in the HF config (`hf_overrides`), every layer
  writes the partitions it chose for this step's tokens into one `RouteRecorder` step buffer on the device, inside
  the op, so FULL decode graphs capture the write; the model files them per request after the forward
  (`model.SSEHForCausalLM.compute_logits`).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch
from sse_rl.models.configuration import SSE_STATE_DTYPE, SSEHConfig
from sse_rl.models.layers import NO_ROUTE, GatedRMSNorm, route_dtype
from sse_rl.models.ops import SSEFeatures, sse_chunk, sse_decode, sse_features, sse_router
from sse_rl.models.vllm.backend import SSEStateMetadata
from sse_rl.models.vllm.compat import STATE_BACKEND
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

OP_NAME = "sse_h_mix"
# vLLM's mamba_ssm_cache_dtype values SSE-H stores its state in. "auto" is fp32 whatever the model dtype (vLLM's
# Mamba layers take the model's): the state a trainer's forward carries, so the engine matches training by default.
STATE_CACHE_DTYPES = {"auto": SSE_STATE_DTYPE, "float32": torch.float32, "bfloat16": torch.bfloat16}


def sse_state_dtype(mamba_ssm_cache_dtype: str) -> torch.dtype:
    """The dtype of the SSE state cache for vLLM's `mamba_ssm_cache_dtype` (engine argument, `CacheConfig`)."""
    if mamba_ssm_cache_dtype not in STATE_CACHE_DTYPES:
        raise ValueError(f"SSE-H stores its recurrent state in float32 or bfloat16, got mamba_ssm_cache_dtype="
                         f"{mamba_ssm_cache_dtype!r}; please use --mamba-ssm-cache-dtype with one of "
                         f"{', '.join(STATE_CACHE_DTYPES)} ('auto' = float32)")
    return STATE_CACHE_DTYPES[mamba_ssm_cache_dtype]


def x_proj_parts(config: SSEHConfig) -> tuple[str, ...]:
    """HF modules stacked into `x_proj`, in shard order. The router's N (= 4) columns come last, so that every
    slice that feeds another matmul starts on a 16-byte boundary: for a misaligned input cuBLAS picks a slower,
    2-element-aligned kernel (bench/results/vllm_decode_profile_h200.md)."""
    gate = ("g_proj.0",) if config.use_output_gate else ()
    return ("lora_q_proj.0", "lora_k_proj.0", "gk_proj.0.0", "gk_proj.1.0", *gate, "e_proj")


class RouteRecorder:
    """The partitions every SSE layer chose, per request and token position (issue #28's measurement and replay).

    Per step, each SSE layer writes its choices for the step's token rows into `step` [max tokens, S, K] on the
    device (S = SSE layers in model order, K = top_k, `layers.route_dtype`: 1 byte per token, layer and k); after
    the forward, `collect` copies the real rows to the host and files them under the request each row belongs to,
    at its position. `take` hands out (and forgets) every request's routes [positions, S, K], NO_ROUTE at positions
    not computed by that request: prompt tokens served from the prefix cache and the last sampled token, which no
    forward has seen yet.
    """

    def __init__(self, num_sse_layers: int, top_k: int, num_partitions: int, max_tokens: int,
                 device: torch.device | str | None = None) -> None:
        if num_partitions >= NO_ROUTE:
            raise NotImplementedError(f"route recording stores partitions as uint8 and needs fewer than {NO_ROUTE} "
                                      f"partitions, got num_sparse_partition={num_partitions}")
        self.top_k = top_k
        self.step = torch.zeros(max_tokens, num_sse_layers, top_k, dtype=route_dtype(num_partitions),
                                device=device)  # [max tokens, S, K]
        self.runner: Any = None  # the worker's model runner, attached by `model.enable_route_recording`
        self.chunks: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)  # request -> (first position, rows)

    def write(self, sse_index: int, router_logits: torch.Tensor) -> None:
        """Layer `sse_index`'s choices for the step's first T token rows, from its router logits [T, N] (the same
        top-K rule as the kernels); device work only, so it can be captured in a CUDA graph."""
        n = min(router_logits.shape[0], self.step.shape[0])
        self.step[:n, sse_index] = sse_router(router_logits[:n], top_k=self.top_k)[2].to(self.step.dtype)

    def collect(self) -> None:
        """File this step's rows under their requests (host side; a no-op before a runner is attached, e.g. in
        vLLM's warm-up and profiling runs). Token rows follow the runner's batch order: request i owns rows
        query_start_loc[i]:query_start_loc[i+1], at positions from its num_computed_tokens on."""
        if self.runner is None:
            return
        batch = self.runner.input_batch
        num_reqs = batch.num_reqs
        if num_reqs == 0:
            return
        bounds = self.runner.query_start_loc.np[: num_reqs + 1].tolist()
        first = batch.num_computed_tokens_cpu[:num_reqs].tolist()
        rows = self.step[: bounds[-1]].to("cpu", copy=True).numpy()  # [tokens, S, K]; a copy also on CPU
        for i, request_id in enumerate(batch.req_ids[:num_reqs]):
            if bounds[i + 1] > bounds[i]:
                self.chunks[request_id].append((int(first[i]), rows[bounds[i]: bounds[i + 1]]))

    def take(self) -> dict[str, np.ndarray]:
        """Every recorded request's routes [positions, S, K] (NO_ROUTE where not computed), keyed by vLLM's
        internal request id; the records are forgotten."""
        out = {}
        for request_id, chunks in self.chunks.items():
            length = max(start + len(rows) for start, rows in chunks)
            routes = np.full((length, *self.step.shape[1:]), NO_ROUTE, dtype=chunks[0][1].dtype)
            for start, rows in chunks:  # in step order: a recomputed (preempted) position keeps its latest record
                routes[start: start + len(rows)] = rows
            out[request_id] = routes
        self.chunks.clear()
        return out


class SSEHMixer(nn.Module, MambaBase):
    """SSE layer of SSE-H (docs/sse_layer.md) with parameter names of the HF model (`...attn.<name>`)."""

    def __init__(self, config: SSEHConfig, *, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        if vllm_config.speculative_config is not None:
            raise NotImplementedError("SSE-H in vLLM does not support speculative decoding; drop the "
                                      "speculative_config / --speculative-config option")
        self.prefix = prefix
        # This layer's place among the SSE layers (its column in recorded routes); the model sets `recorder`.
        self.sse_index = [i for i, kind in enumerate(config.layer_types)
                          if kind != "full_attention"].index(extract_layer_index(prefix))
        self.recorder: RouteRecorder | None = None
        self.state_shape = config.sse_state_shape(get_tensor_model_parallel_world_size())
        self.state_dtype = sse_state_dtype(vllm_config.cache_config.mamba_ssm_cache_dtype)
        _, self.num_heads, self.head_k_dim, self.head_v_dim = self.state_shape
        self.top_k = config.num_writer
        self.gate_logit_normalizer = config.gate_logit_normalizer
        hidden, heads, dk, dv = config.hidden_size, config.num_heads, config.head_dim, config.head_v_dim
        rank = config.gate_low_rank_dim

        self.qkv_proj = MergedColumnParallelLinear(hidden, [heads * dk, heads * dk, heads * dv], bias=False,
                                                   prefix=f"{prefix}.qkv_proj")
        self.x_parts = x_proj_parts(config)
        width = {"lora_q_proj.0": dv, "lora_k_proj.0": dv, "gk_proj.0.0": rank, "gk_proj.1.0": rank, "g_proj.0": dv,
                 "e_proj": config.num_sparse_partition}
        self.x_sizes = [width[part] for part in self.x_parts]
        self.x_proj = MergedColumnParallelLinear(hidden, self.x_sizes, bias=False, disable_tp=True,
                                                 prefix=f"{prefix}.x_proj")
        self.lora_q_proj = ColumnParallelLinear(dv, heads * dk, bias=False, prefix=f"{prefix}.lora_q_proj")
        self.lora_k_proj = ColumnParallelLinear(dv, heads * dk, bias=False, prefix=f"{prefix}.lora_k_proj")
        self.gk_proj = nn.ModuleList([
            ColumnParallelLinear(rank, heads * dk, bias=True, prefix=f"{prefix}.gk_proj.{i}") for i in range(2)])
        self.g_proj = ColumnParallelLinear(dv, heads * dv, bias=False, prefix=f"{prefix}.g_proj") \
            if config.use_output_gate else None
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
        return (self.state_dtype,)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Features (compiled) -> state mixing on the cache (opaque op) -> gated norm and o_proj (compiled)."""
        features, router_logits, gate = self._features(hidden_states)
        o = torch.empty_like(features.v)  # [T, H, dv], every row written by the op
        # The custom op's schema lists the features flat, in SSEFeatures' order.
        torch.ops.vllm.sse_h_mix(*features, router_logits, o, self.prefix)
        y, _ = self.o_proj(self.o_norm(o, gate).flatten(1))
        return y

    def mix(self, features: SSEFeatures, router_logits: torch.Tensor, o: torch.Tensor) -> None:
        """Body of the custom op: decode rows, then prefill rows, on this layer's cached states, into `o`; rows
        past them (padding of a piecewise CUDA graph) are zeroed. In a FULL decode graph every row is a decode row
        (padding rows have slot -1 and the kernel writes their zeros), so nothing else is launched."""
        metadata = get_forward_context().attn_metadata
        # No metadata during vLLM's memory-profiling run: states are not allocated yet.
        if metadata is None:
            o.zero_()
            return
        step = metadata[self.prefix]
        assert isinstance(step, SSEStateMetadata), f"{self.prefix}: unexpected metadata {type(step)}"
        self._decode(features, router_logits, step, o)
        self._prefill(features, router_logits, step, o)
        num_rows = step.num_decode_tokens + step.num_prefill_tokens
        o[num_rows:].zero_()
        if self.recorder is not None:
            self.recorder.write(self.sse_index, router_logits[:num_rows])

    def _features(self, x: torch.Tensor) -> tuple[SSEFeatures, torch.Tensor, torch.Tensor | None]:
        """The op's features of x [T, D] (fields [T, H, dk] / [T, H, dv]), the router logits [T, N] and the output
        gate [T, H, dv] (None without one)."""
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.num_heads * self.head_k_dim] * 2 + [self.num_heads * self.head_v_dim], dim=-1)
        xs, _ = self.x_proj(x)
        part = dict(zip(self.x_parts, xs.split(self.x_sizes, dim=-1)))
        features = sse_features(
            q=q, k=k, q_lora=self.lora_q_proj(part["lora_q_proj.0"])[0],
            k_lora=self.lora_k_proj(part["lora_k_proj.0"])[0], v=v, gate_shared=self.gk_proj[0](part["gk_proj.0.0"])[0],
            gate_sparse=self.gk_proj[1](part["gk_proj.1.0"])[0], num_heads=self.num_heads,
            gate_logit_normalizer=self.gate_logit_normalizer)
        gate = None if self.g_proj is None else self.g_proj(part["g_proj.0"])[0].view_as(features.v)
        return features, part["e_proj"].contiguous(), gate

    def _decode(self, features: SSEFeatures, router_logits: torch.Tensor, step: SSEStateMetadata,
                o: torch.Tensor) -> None:
        """One token per decode row, state updated in place; padded rows (slot -1) give zero output."""
        n = step.num_decode_tokens
        if n == 0:
            return
        state = self.kv_cache[0]  # [num_slots, *state_shape]
        sse_decode(features=features.map(lambda f: f[:n]), router_logits=router_logits[:n], state=state,
                   slot_ids=step.decode_slots, top_k=self.top_k, out=o[:n])

    def _prefill(self, features: SSEFeatures, router_logits: torch.Tensor, step: SSEStateMetadata,
                 o: torch.Tensor) -> None:
        """Packed prefill rows through the chunk op, starting from cached (or zero) states, writing final states
        (the op returns them in the cache's dtype)."""
        if step.num_prefills == 0:
            return
        start, end = step.num_decode_tokens, step.num_decode_tokens + step.num_prefill_tokens
        state = self.kv_cache[0]  # [num_slots, *state_shape]
        slots = step.prefill_slots
        # New requests own recycled slots: never read them (where, not multiply: garbage may be NaN).
        initial = torch.where(step.prefill_has_initial_state[:, None, None, None, None], state[slots], 0.0)
        out, final = sse_chunk(features=features.map(lambda f: f[None, start:end]),
                               router_logits=router_logits[None, start:end], top_k=self.top_k, initial_state=initial,
                               output_final_state=True, cu_seqlens=step.prefill_cu_seqlens)
        o[start:end] = out[0]
        state[slots] = final


def _sse_h_mix(q_shared: torch.Tensor, k_shared: torch.Tensor, q_sparse: torch.Tensor, k_sparse: torch.Tensor,
               v: torch.Tensor, g_shared: torch.Tensor, g_sparse: torch.Tensor, router_logits: torch.Tensor,
               output: torch.Tensor, layer_name: str) -> None:
    layer: SSEHMixer = get_forward_context().no_compile_layers[layer_name]
    features = SSEFeatures(q_shared, k_shared, q_sparse, k_sparse, v, g_shared, g_sparse)
    layer.mix(features, router_logits, output)


def _sse_h_mix_fake(q_shared: torch.Tensor, k_shared: torch.Tensor, q_sparse: torch.Tensor, k_sparse: torch.Tensor,
                    v: torch.Tensor, g_shared: torch.Tensor, g_sparse: torch.Tensor, router_logits: torch.Tensor,
                    output: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(op_name=OP_NAME, op_func=_sse_h_mix, mutates_args=["output"],
                          fake_impl=_sse_h_mix_fake)
