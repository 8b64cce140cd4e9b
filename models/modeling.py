"""SSE-H as a Hugging Face causal LM: embeddings -> [pre-norm block: SSE mixer or attention, SwiGLU MLP] x L -> norm.

- Parameter names match fla's `SSEForCausalLM` (`model.embeddings`, `model.layers.{i}.attn`, ..., `lm_head`).
- Padding-free packing: pass `cu_seqlens`, or packed `position_ids` of shape [1, L] that restart at 0 for each
  sequence; every sequence then gives exactly what it gives alone (SSE states and attention never cross bounds).
- Padded batches: `attention_mask` [B, T_past + T] (0 = pad). Pad tokens neither write nor decay SSE states and are
  masked as attention keys, so left or right padding does not change the real tokens' outputs.
- Cache: transformers' `DynamicCache(config=...)`; SSE layers hold an fp32 state [B, N+1, H, dk, dv]
  (`configuration.sse_state_shape` per sequence), attention layers their K/V. Works with `generate` (greedy,
  sampling, beam search).
- Loss: next-token cross entropy + aux_loss_coef * sum of the SSE layers' router balance losses (training mode).
- `config.lm_head_fp32` (an attribute the RL trainer and `hf_overrides` set; absent = off): the final norm returns
  fp32 and the LM head runs in fp32 with autocast off (`lm_head_logits`), so the logits carry no bf16 rounding (a
  model loaded in bf16 upcasts its head weights for the matmul).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from sse_rl.models.configuration import SSEHConfig
from sse_rl.models.layers import NO_ROUTE, Attention, GatedMLP, RMSNorm, SSEMixer, route_dtype, uses_varlen
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils import ModelOutput


class SSEHBlock(GradientCheckpointingLayer):
    """Pre-norm block: h = x + mixer(norm(x)); out = h + mlp(norm(h)). Maps the config onto the layers' arguments."""

    def __init__(self, config: SSEHConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if config.layer_types[layer_idx] == "full_attention":
            self.attn = Attention(hidden_size=config.hidden_size, num_heads=config.attn_num_heads,
                                  num_kv_heads=config.attn_num_kv_heads, head_dim=config.attn_head_dim,
                                  rope_theta=config.rope_theta, layer_idx=layer_idx,
                                  qkv_bias=config.attn_qkv_bias, o_bias=config.attn_o_bias,
                                  qk_norm=config.attn_qk_norm, norm_eps=config.norm_eps,
                                  rope_scaling=config.attn_rope_scaling,
                                  max_position_embeddings=config.max_position_embeddings)
        else:
            self.attn = SSEMixer(hidden_size=config.hidden_size, num_heads=config.num_heads, head_dim=config.head_dim,
                                 expand_v=config.expand_v, num_sparse_partition=config.num_sparse_partition,
                                 top_k=config.num_writer, use_output_gate=config.use_output_gate,
                                 gate_low_rank_dim=config.gate_low_rank_dim,
                                 gate_logit_normalizer=config.gate_logit_normalizer, norm_eps=config.norm_eps,
                                 layer_idx=layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: Tensor, position_ids: Tensor | None = None, attn_mask: Tensor | None = None,
                token_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                past_key_values: Cache | None = None, routes: Tensor | None = None,
                output_routes: bool = False) -> tuple[Tensor, ...]:
        """Returns the new hidden states [B, T, D] and the layer's router aux loss (0 for attention layers), and with
        output_routes the SSE partitions used [B, T, K] (None for attention layers). routes: [B, T, K] partitions an
        SSE layer replays (`SSEMixer.forward`)."""
        h = self.attn_norm(hidden_states)
        used = None
        if isinstance(self.attn, Attention):
            h, aux = (self.attn(h, position_ids, attn_mask, past_key_values, cu_seqlens),
                      h.new_zeros((), dtype=torch.float32))
        elif output_routes:
            h, aux, used = self.attn(h, token_mask, cu_seqlens, past_key_values, routes, output_routes=True)
        else:
            h, aux = self.attn(h, token_mask, cu_seqlens, past_key_values, routes)
        hidden_states = hidden_states + h
        hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states))
        return (hidden_states, aux, used) if output_routes else (hidden_states, aux)


@dataclass
class SSEHModelOutput(BaseModelOutputWithPast):
    """`BaseModelOutputWithPast` plus the sum over SSE layers of the router balance loss (0 outside training) and,
    with output_routes, the partitions every SSE layer used: routes [B, T, num SSE layers, K] (`layers.route_dtype`)."""

    aux_loss: Tensor | None = None
    routes: Tensor | None = None


@dataclass
class SSEHCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus, with output_routes, the partitions every SSE layer used:
    routes [B, T, num SSE layers, K] in `layers.route_dtype` (uint8 for fewer than 255 partitions)."""

    routes: Tensor | None = None


def lm_head_logits(lm_head: nn.Module, hidden: Tensor, fp32: bool) -> Tensor:
    """Logits [..., V] of hidden states [..., D]; with `fp32`, in fp32 with autocast off, whatever the surrounding
    compute dtype (`config.lm_head_fp32`; the trainer calls this for any causal LM's head)."""
    if not fp32:
        return lm_head(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        if lm_head.weight.dtype == torch.float32:  # the trainer's masters (an fsdp2 unit unshards them in its call)
            return lm_head(hidden.float())
        return nn.functional.linear(hidden.float(), lm_head.weight.float())  # a model loaded in bf16: upcast


def check_routes_values(routes: Tensor, num_partitions: int) -> None:
    """Replayed routes [..., K] hold partitions in [0, N), or NO_ROUTE (the layer's own choice), and name K distinct
    partitions per token: checked once per forward for every layer (one host sync; the ops check the values only
    off CUDA)."""
    if num_partitions >= NO_ROUTE:
        raise NotImplementedError(f"routing replay needs fewer than {NO_ROUTE} partitions per SSE layer, "
                                  f"got num_sparse_partition={num_partitions}")
    r = routes.long()
    bad = ((r < 0) | (r >= num_partitions)) & (r != NO_ROUTE)
    ordered = r.sort(-1).values
    repeated = (ordered.diff(dim=-1) == 0) & (ordered[..., 1:] != NO_ROUTE)  # empty for K = 1
    if bool(bad.any() | repeated.any()):
        raise ValueError(f"routes must hold K distinct partitions in [0, {num_partitions}) per token (or {NO_ROUTE} "
                         f"for 'not recorded'), got out-of-range values {sorted(set(r[bad].tolist()))[:8]} "
                         f"and {int(repeated.sum())} repeated entries")


class SSEHPreTrainedModel(PreTrainedModel):
    config_class = SSEHConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["SSEHBlock"]
    _supports_sdpa = True


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor | None:
    """Sequence bounds [S+1] of packed position ids [1, L] restarting at 0, or None for a single sequence."""
    starts = (position_ids[0] == 0).nonzero().squeeze(-1)  # [S]
    if starts.numel() <= 1:
        return None
    if int(starts[0]) != 0:
        raise ValueError("packed position_ids must start at 0 (each sequence restarts its positions at 0)")
    end = torch.tensor([position_ids.shape[1]], device=starts.device)
    return torch.cat([starts, end])


def packed_position_ids(cu_seqlens: Tensor) -> Tensor:
    """Positions restarting at 0 in each packed sequence: [1, L]."""
    lengths = cu_seqlens.diff()  # [S]
    token = torch.arange(int(cu_seqlens[-1]), device=cu_seqlens.device)
    return (token - cu_seqlens[:-1].repeat_interleave(lengths))[None]


def attention_mask_4d(q_len: int, k_len: int, key_mask: Tensor | None, cu_seqlens: Tensor | None,
                      device: torch.device) -> Tensor | None:
    """Boolean SDPA mask [B, 1, q_len, k_len] (True = attend), or None when plain causal attention is right.

    key_mask: [B, k_len] (False = padding); cu_seqlens: packed bounds (block-diagonal causal, q_len == k_len).
    Every query may attend to itself, so the rows of padded queries stay finite.
    """
    if key_mask is None and cu_seqlens is None:
        return None
    q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)  # [q, 1] absolute query positions
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, k]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, q, k]
    if cu_seqlens is not None:
        seq = torch.searchsorted(cu_seqlens[1:], k_pos[0], right=True)  # [k] sequence of each token
        mask = mask & (seq[:, None] == seq[None, :])[None, None]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
    return mask | (k_pos == q_pos)[None, None]


class SSEHModel(SSEHPreTrainedModel):
    def __init__(self, config: SSEHConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SSEHBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, use_cache: bool | None = None,
                cu_seqlens: Tensor | None = None, output_hidden_states: bool | None = None,
                routes: Tensor | None = None, output_routes: bool = False, **kwargs) -> SSEHModelOutput:
        """input_ids: [B, T]; attention_mask: [B, T_past + T] (1 = real token); position_ids: [B, T];
        cu_seqlens: [S+1] packed sequence bounds (B = 1), also derived from packed position_ids;
        routes: [B, T, num SSE layers, K] integer partitions the SSE layers use instead of their top-K (routing
        replay, layers in model order; NO_ROUTE = the layer's own choice for that token), e.g. the engine's record
        or another forward's output routes; output_routes: return the partitions used (`SSEHModelOutput.routes`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        batch, length = hidden.shape[:2]
        key_mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        cu_seqlens = self._packing(cu_seqlens, position_ids, key_mask, past_key_values, batch, hidden.device)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cu_seqlens is None and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None and self.config.attn_layers else 0
        if position_ids is None:
            position_ids = (packed_position_ids(cu_seqlens) if cu_seqlens is not None else
                            torch.arange(past_len, past_len + length, device=hidden.device)[None].expand(batch, -1))
        # packed sequences in flash varlen attention need no dense mask (layers.uses_varlen)
        attn_mask = None if cu_seqlens is not None and uses_varlen(hidden) else \
            attention_mask_4d(length, past_len + length, key_mask, cu_seqlens, hidden.device)
        token_mask = None if key_mask is None else key_mask[:, -length:]  # [B, T]
        layer_routes = self._layer_routes(routes, batch, length)
        all_hidden = [] if output_hidden_states else None
        aux_loss = hidden.new_zeros((), dtype=torch.float32)
        used = []
        for layer, replay in zip(self.layers, layer_routes):
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden, aux, *chosen = layer(hidden, position_ids=position_ids, attn_mask=attn_mask, token_mask=token_mask,
                                         cu_seqlens=cu_seqlens, past_key_values=past_key_values, routes=replay,
                                         output_routes=output_routes)
            aux_loss = aux_loss + aux
            if chosen and chosen[0] is not None:
                used.append(chosen[0])
        # RMSNorm computes in fp32 and returns the input's dtype: an fp32 input keeps its output unrounded
        hidden = self.norm(hidden.float() if getattr(self.config, "lm_head_fp32", False) else hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        out_routes = None
        if output_routes:
            out_routes = torch.stack(used, 2).to(route_dtype(self.config.num_sparse_partition)) if used else \
                torch.zeros(batch, length, 0, self.config.num_writer, dtype=torch.uint8, device=hidden.device)
        return SSEHModelOutput(last_hidden_state=hidden, past_key_values=past_key_values,
                               hidden_states=tuple(all_hidden) if all_hidden is not None else None, aux_loss=aux_loss,
                               routes=out_routes)

    def _layer_routes(self, routes: Tensor | None, batch: int, length: int) -> list[Tensor | None]:
        """Per layer, the routes [B, T, K] it replays (None for attention layers, or without routes)."""
        if routes is None:
            return [None] * len(self.layers)
        sse = [i for i, kind in enumerate(self.config.layer_types) if kind != "full_attention"]
        want = (batch, length, len(sse), self.config.num_writer)
        if routes.is_floating_point() or routes.dtype == torch.bool or tuple(routes.shape) != want:
            raise ValueError(f"routes must be an integer tensor [B, T, num SSE layers, K] = {want}, got "
                             f"{routes.dtype} {tuple(routes.shape)}")
        check_routes_values(routes, self.config.num_sparse_partition)
        per_layer: list[Tensor | None] = [None] * len(self.layers)
        for j, i in enumerate(sse):
            per_layer[i] = routes[:, :, j]
        return per_layer

    @staticmethod
    def _packing(cu_seqlens: Tensor | None, position_ids: Tensor | None, key_mask: Tensor | None,
                 past_key_values: Cache | None, batch: int, device: torch.device) -> Tensor | None:
        """The packed-sequence bounds to use (None for ordinary batches), checking the inputs agree with packing."""
        if cu_seqlens is None and position_ids is not None and batch == 1 and key_mask is None:
            cu_seqlens = cu_seqlens_from_position_ids(position_ids)
        if cu_seqlens is None:
            return None
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need input of batch size 1, got {batch}")
        if past_key_values is not None:
            raise ValueError("packed sequences (cu_seqlens) cannot be combined with past_key_values")
        if key_mask is not None:
            raise ValueError("packed sequences (cu_seqlens) are padding-free: do not pass an attention_mask with 0s")
        return cu_seqlens.to(device=device, dtype=torch.long)


class SSEHForCausalLM(SSEHPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: SSEHConfig) -> None:
        super().__init__(config)
        self.model = SSEHModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def generate(self, *args: Any, **kwargs: Any) -> Tensor | ModelOutput:
        """HF generation; transformers' cache counts the sequence length on attention layers, so it needs one."""
        if not self.config.attn_layers:
            raise NotImplementedError("HF generate needs at least one attention layer (config.attn_layers is empty): "
                                      "transformers' cache counts the sequence length on attention layers; use the "
                                      "vLLM plugin, or call the model step by step with past_key_values")
        return super().generate(*args, **kwargs)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                cu_seqlens: Tensor | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int = 0, routes: Tensor | None = None, output_routes: bool = False,
                **kwargs) -> SSEHCausalLMOutput:
        """labels: [B, T] aligned with input_ids (shifted inside; -100 = ignored). With packed sequences, set the
        label of each sequence's first token to -100 so no sequence predicts the next one's start.
        logits_to_keep: compute logits for the last n positions only (0 = all).
        routes / output_routes: routing replay and the partitions used, as in `SSEHModel.forward`."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cu_seqlens=cu_seqlens, output_hidden_states=output_hidden_states, routes=routes,
                         output_routes=output_routes)
        hidden = out.last_hidden_state if logits_to_keep == 0 else out.last_hidden_state[:, -logits_to_keep:]
        logits = lm_head_logits(self.lm_head, hidden, getattr(self.config, "lm_head_fp32", False))  # [B, T, V]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
            loss = loss + self.config.aux_loss_coef * out.aux_loss.to(loss.device)
        return SSEHCausalLMOutput(loss=loss, aux_loss=out.aux_loss, logits=logits, past_key_values=out.past_key_values,
                                  hidden_states=out.hidden_states, routes=out.routes)
