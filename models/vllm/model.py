"""SSE-H for vLLM: SSE layers (`sse_layer.SSEHMixer`, recurrent state in the hybrid cache) interleaved with
softmax-attention layers (vLLM `Attention`, RoPE), pre-norm blocks with a SwiGLU MLP.

Weights load from the HF checkpoint's names (`sse_rl.models`, fla SSE naming); q/k/v (weights and biases) and gate/up
are stacked into `qkv_proj` / `gate_up_proj` here, and an SSE layer's replicated projections of x into `x_proj`
(`stacked_target`).
`load_weights` takes any subset, any number of times (RL weight updates), returns the vLLM names it loaded, and
raises on a name it cannot place.

`hf_overrides={"lm_head_fp32": True}` (issue #28) computes the final norm and the LM head in fp32 from fp32 weights,
as the RL trainer does with `model.lm_head_fp32`: the model returns fp32 hidden states and `compute_logits` runs its
own fp32 matmul (vLLM's `head_dtype` differs between releases and rounds the hidden states to the model dtype on
CUDA). It costs an fp32 copy of the LM head (twice its bf16 memory) and an fp32 matmul per sampled position.

vLLM's `mamba_ssm_cache_dtype` (engine argument) sets the SSE state cache's dtype: "auto"/"float32" keep fp32 (the
state the trainer carries), "bfloat16" halves the state's bytes (issue #27; `sse_layer.sse_state_dtype`).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from sse_rl.models.layers import scaled_rope_frequencies
from sse_rl.models.vllm import compat
from sse_rl.models.vllm.sse_layer import RouteRecorder, SSEHMixer, sse_state_dtype, x_proj_parts
from torch import nn
from transformers import PretrainedConfig
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.utils import extract_layer_index, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors


class SSEHMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)); gate/up stacked into one column-parallel matmul."""

    def __init__(self, config: PretrainedConfig, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act_fn(gate_up))
        return out


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """`get_rope`'s rope_parameters for the attention layers: `rope_theta` plus `attn_rope_scaling`, completed the way
    transformers completes them for the HF model (`layers.RotaryEmbedding`), so both rotate alike:
    original_max_position_embeddings defaults to max_position_embeddings (llama3, yarn), YaRN's factor to their ratio,
    beta_fast/beta_slow to 32/1, and YaRN's cos/sin factor is the one transformers computes (explicit
    attention_factor, the mscale/mscale_all_dim ratio, or 0.1 ln(factor) + 1), passed in this vLLM's spelling."""
    scaling = {k: v for k, v in (config.attn_rope_scaling or {}).items() if v is not None}
    rope_type = scaling.get("rope_type", "default")
    params: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(config.rope_theta)}
    if rope_type == "default":
        return params
    if rope_type == "linear":  # vLLM takes a float factor (anything else it iterates over as a list of factors)
        return {**params, "factor": float(scaling["factor"])}
    original = int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    if rope_type == "llama3":
        return {**params, "factor": float(scaling["factor"]), "low_freq_factor": float(scaling["low_freq_factor"]),
                "high_freq_factor": float(scaling["high_freq_factor"]), "original_max_position_embeddings": original}
    if rope_type == "yarn":
        _, attention_factor = scaled_rope_frequencies(config.attn_head_dim, config.rope_theta, scaling,
                                                      config.max_position_embeddings)
        params = {**params, "factor": float(scaling.get("factor") or config.max_position_embeddings / original),
                  "original_max_position_embeddings": original, "beta_fast": scaling.get("beta_fast") or 32,
                  "beta_slow": scaling.get("beta_slow") or 1, **compat.yarn_attention_factor(attention_factor)}
        if "truncate" in scaling:
            params["truncate"] = bool(scaling["truncate"])
        return params
    raise ValueError(f"SSE-H vLLM attention has no RoPE scaling {rope_type!r} (config.attn_rope_scaling)")


class SSEHAttention(nn.Module):
    """Full causal softmax attention with RoPE, heads sharded over TP, with the options of converted Transformers
    (the HF reference is `layers.Attention`): q/k/v bias (`attn_qkv_bias`, in `qkv_proj.bias`), o_proj bias
    (`attn_o_bias`), per-head RMSNorm of q and k over head_dim after the projection and before RoPE (`attn_qk_norm`,
    `q_norm`/`k_norm`, eps `norm_eps`, as vLLM's Qwen3) and scaled RoPE (`attn_rope_scaling`: linear, llama3, yarn;
    `rope_parameters`).

    max_model_len: the engine's; a YaRN cos/sin cache covers only original_max_position_embeddings x factor positions
    in vLLM, and a longer max_model_len is refused here rather than indexed past the cache at run time.
    """

    def __init__(self, config: PretrainedConfig, cache_config: CacheConfig | None, prefix: str,
                 max_model_len: int | None = None) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        heads, kv_heads, head_dim = config.attn_num_heads, config.attn_num_kv_heads, config.attn_head_dim
        if heads % tp_size or (kv_heads % tp_size and tp_size % kv_heads):
            raise ValueError(f"SSE-H attention heads ({heads} q / {kv_heads} kv) do not split over "
                             f"tensor-parallel size {tp_size}")
        self.head_dim = head_dim
        self.q_size = heads // tp_size * head_dim
        self.kv_size = max(1, kv_heads // tp_size) * head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, heads, kv_heads, bias=config.attn_qkv_bias,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(heads * head_dim, config.hidden_size, bias=config.attn_o_bias,
                                        prefix=f"{prefix}.o_proj")
        self.qk_norm = config.attn_qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(head_dim, eps=config.norm_eps)
        self.rotary_emb = get_rope(head_dim, max_position=config.max_position_embeddings, is_neox_style=True,
                                   rope_parameters=rope_parameters(config))
        covered = self.rotary_emb.cos_sin_cache.shape[0]
        if max_model_len is not None and max_model_len > covered:
            raise ValueError(f"SSE-H attention RoPE ({config.attn_rope_scaling}) covers {covered} positions in vLLM, "
                             f"fewer than max_model_len={max_model_len}; lower max_model_len to {covered} or less")
        self.attn = Attention(heads // tp_size, head_dim, head_dim**-0.5, num_kv_heads=max(1, kv_heads // tp_size),
                              cache_config=cache_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # per head: views [T, heads, head_dim], as vLLM's Qwen3Attention
            q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class SSEHDecoderLayer(nn.Module):
    """Pre-norm block: x + mixer(attn_norm(x)), then + mlp(mlp_norm(.)); residual adds fused into the norms."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.is_attention = extract_layer_index(prefix) in config.attn_layers
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if self.is_attention:
            self.attn = SSEHAttention(config, vllm_config.cache_config, prefix=f"{prefix}.attn",
                                      max_model_len=vllm_config.model_config.max_model_len)
        else:
            self.attn = SSEHMixer(config, vllm_config=vllm_config, prefix=f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SSEHMLP(config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.attn_norm(hidden_states)
        else:
            hidden_states, residual = self.attn_norm(hidden_states, residual)
        if self.is_attention:
            hidden_states = self.attn(positions, hidden_states)
        else:
            hidden_states = self.attn(hidden_states)
        hidden_states, residual = self.mlp_norm(hidden_states, residual)
        return self.mlp(hidden_states), residual


# Token-count dims are dynamic (explicit: postponed annotations hide the tensor types from the decorator).
@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "intermediate_tensors": 0,
                                         "inputs_embeds": 0})
class SSEHModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                 prefix=f"{prefix}.embeddings")
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, lambda prefix: SSEHDecoderLayer(vllm_config, prefix),
            prefix=f"{prefix}.layers")
        self.norm_fp32 = getattr(config, "lm_head_fp32", False)
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps,
                            dtype=torch.float32 if self.norm_fp32 else None)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        if self.norm_fp32:
            return self._norm_fp32(hidden_states + residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _norm_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm in fp32 with its fp32 weight, as the HF model's with `lm_head_fp32`: [T, D] fp32."""
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm.variance_epsilon) * self.norm.weight


def stacked_target(name: str, attn_layers: set[int],
                   x_parts: tuple[str, ...]) -> tuple[str, int | str | None]:
    """HF checkpoint name -> (vLLM parameter name, shard id of a stacked parameter or None); `x_parts` are the
    modules an SSE layer stacks into `x_proj` (`sse_layer.x_proj_parts`)."""
    parts = name.split(".")
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        shard = 0 if ".gate_proj." in name else 1
        return name.replace(".gate_proj.", ".gate_up_proj.").replace(".up_proj.", ".gate_up_proj."), shard
    if ".attn." not in name or len(parts) < 3 or not parts[2].isdigit():
        return name, None
    is_attention = int(parts[2]) in attn_layers
    head, _, tail = name.partition(".attn.")
    module, _, param = tail.rpartition(".")  # e.g. "gk_proj.1.0", "weight"
    for index, proj in enumerate(("q", "k", "v")):
        if module == f"{proj}_proj":
            return f"{head}.attn.qkv_proj.{param}", proj if is_attention else index
    if is_attention:
        return name, None
    if module in x_parts:  # replicated projections of x, one matmul
        return f"{head}.attn.x_proj.{param}", x_parts.index(module)
    if module.endswith(".1"):  # the column-parallel second half of a low-rank pair
        return f"{head}.attn.{module[:-2]}.{param}", None
    return name, None


class SSEHForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM entry class for checkpoints whose config.json names `SSEHForCausalLM` (model_type "sse_h")."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise NotImplementedError("SSE-H in vLLM supports tensor parallelism only; use "
                                      "--pipeline-parallel-size 1")
        self.config = config
        self.attn_layers = set(config.attn_layers)
        self.x_parts = x_proj_parts(config)
        self.model = SSEHModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head_fp32 = getattr(config, "lm_head_fp32", False)
        if self.lm_head_fp32 and config.tie_word_embeddings:
            raise NotImplementedError("lm_head_fp32 keeps an fp32 LM head apart from the embeddings; this checkpoint "
                                      "ties them (tie_word_embeddings): leave lm_head_fp32 off")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"),
                                      params_dtype=torch.float32 if self.lm_head_fp32 else None)
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.checkpoint_shapes: dict[str, tuple[int, ...]] = {}
        self.route_recorder = self._route_recorder(vllm_config) if getattr(config, "record_routes", False) else None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # Runs eagerly once per forward (outside CUDA graphs), after the SSE layers wrote this step's routes.
        if self.route_recorder is not None:
            self.route_recorder.collect()
        if self.lm_head_fp32:
            return self._logits_fp32(hidden_states)
        return self.logits_processor(self.lm_head, hidden_states)

    def _logits_fp32(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits [T, V] fp32 from fp32 hidden states and the fp32 LM head (module doc), gathered over TP ranks."""
        logits = torch.nn.functional.linear(hidden_states.float(), self.lm_head.weight)  # [T, V_padded / TP]
        if self.lm_head.tp_size > 1:
            logits = tensor_model_parallel_all_gather(logits)
        return logits[..., :self.config.vocab_size]

    def _route_recorder(self, vllm_config: VllmConfig) -> RouteRecorder:
        """One recorder shared by the SSE layers, its step buffer as large as the largest step."""
        mixers = [m for m in self.modules() if isinstance(m, SSEHMixer)]
        scheduler = vllm_config.scheduler_config
        recorder = RouteRecorder(len(mixers), self.config.num_writer, self.config.num_sparse_partition,
                                 max(scheduler.max_num_batched_tokens, scheduler.max_num_seqs))
        for mixer in mixers:
            mixer.recorder = recorder
        return recorder

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...]]:
        config = vllm_config.model_config.hf_config
        return (config.sse_state_shape(vllm_config.parallel_config.tensor_parallel_size),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype]:
        return (sse_state_dtype(vllm_config.cache_config.mamba_ssm_cache_dtype),)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple:
        """Prefix caching ("align" mode) copies a whole SSE state page between blocks."""
        return (get_temporal_copy_spec,)

    def vllm_target(self, name: str) -> tuple[str, int | str | None]:
        """HF checkpoint name -> (vLLM parameter name, shard id or None)."""
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            name = "model.embeddings.weight"
        return stacked_target(name, self.attn_layers, self.x_parts)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors (all or any subset); returns the vLLM parameter names written.

        Also records each checkpoint name's full shape (`checkpoint_shapes`), against which weight updates are
        validated before they touch the model.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            target, shard = self.vllm_target(name)
            if target not in params:
                raise ValueError(f"checkpoint weight {name!r} has no SSE-H vLLM parameter (looked for {target!r}); "
                                 "expected HF SSE-H names such as 'model.layers.0.attn.q_proj.weight'")
            param = params[target]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            args = (param, tensor) if shard is None else (param, tensor, shard)
            try:
                weight_loader(*args)
            except (AssertionError, ValueError, RuntimeError) as err:  # vLLM's loaders assert on shapes
                raise ValueError(f"checkpoint weight {name!r} {tuple(tensor.shape)} does not fit SSE-H vLLM "
                                 f"parameter {target!r} {tuple(param.shape)} (shard {shard}): {err}") from err
            loaded.add(target)
            self.checkpoint_shapes[name] = tuple(tensor.shape)
        return loaded


def enable_route_recording(worker: Any) -> None:
    """`LLM.collective_rpc(enable_route_recording)`: start filing the routes of an engine built with
    `hf_overrides={"record_routes": True}` under their requests (the recorder reads the runner's batch layout)."""
    runner = worker.model_runner
    recorder = getattr(runner.get_model(), "route_recorder", None)
    if recorder is None:
        raise ValueError("this engine does not record SSE routes: build it with "
                         "LLM(..., hf_overrides={'record_routes': True})")
    recorder.runner = runner


def take_routes(worker: Any) -> dict[str, Any]:
    """`LLM.collective_rpc(take_routes)`: every recorded request's routes since the last call, as numpy uint8
    [positions, num SSE layers, K] (NO_ROUTE where the request computed no forward: prefix-cache hits, its last
    token), keyed by `route_key` of the request; the worker forgets them."""
    recorder = getattr(worker.model_runner.get_model(), "route_recorder", None)
    if recorder is None or recorder.runner is None:
        raise ValueError("route recording is not enabled: build the engine with hf_overrides={'record_routes': True} "
                         "and call LLM.collective_rpc(enable_route_recording) before generating")
    return {route_key(request_id): routes for request_id, routes in recorder.take().items()}


def route_key(internal_request_id: str) -> str:
    """The key of a request's routes: vLLM's internal id without the 8-character suffix the engine appends to the
    caller's id ("{id}-{suffix}"); sample i of a request with n > 1 is "{i}_{id}" (vLLM's child request id)."""
    head, sep, tail = internal_request_id.rpartition("-")
    return head if sep and len(tail) == 8 else internal_request_id
