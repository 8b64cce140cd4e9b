"""SSEHConfig: presets, derived fields, validation and save/load."""
from __future__ import annotations

import pytest
import torch
from sse_rl.models import SSEHConfig, SSEHForCausalLM
from transformers import AutoConfig


def count_params(config: SSEHConfig) -> int:
    """Parameter count of the model built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in SSEHForCausalLM(config).parameters())


def without_path(config: SSEHConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


def test_2b_preset_is_spec_2_3_and_about_2b_parameters() -> None:
    config = SSEHConfig.from_preset("sse-h-2b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_heads, config.head_dim) == (2560, 18, 10, 256)
    assert (config.num_sparse_partition, config.num_writer, config.vocab_size) == (4, 1, 151936)
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert config.intermediate_size == 6912  # 256 * ceil(2/3 * 4 * 2560 / 256)
    total = count_params(config)
    assert 1.9e9 <= total <= 2.4e9, total
    embeddings = 2 * config.vocab_size * config.hidden_size  # untied
    assert 1.4e9 <= total - embeddings <= 1.6e9, total - embeddings


def test_tiny_preset_is_small_and_vllm_cpu_friendly() -> None:
    config = SSEHConfig.from_preset("sse-h-tiny")
    assert 1e6 <= count_params(config) <= 5e6
    assert config.attn_head_dim >= 32 and config.head_dim >= 32  # vLLM's CPU attention rejects head_dim 16
    assert "full_attention" in config.layer_types and "linear_attention" in config.layer_types


def test_small_preset_is_100_to_150m_with_a_1k_vocab() -> None:
    config = SSEHConfig.from_preset("sse-h-small")
    assert config.vocab_size == 1024 and config.hidden_size >= 512
    assert config.head_dim >= 64 and config.attn_head_dim >= 64
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [4, 9, 13]
    assert 1.0e8 <= count_params(config) <= 1.5e8, count_params(config)


def test_overrides_and_unknown_preset() -> None:
    config = SSEHConfig.from_preset("sse-h-tiny", vocab_size=300, attn_layers=[0, 3])
    assert config.vocab_size == 300
    assert config.layer_types == ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    with pytest.raises(ValueError, match="unknown preset 'sse-h-7b'"):
        SSEHConfig.from_preset("sse-h-7b")


def test_sse_state_shape_is_per_tensor_parallel_rank() -> None:
    """An SSE layer's state per sequence: [N+1, H/tp, dk, dv], the heads sharded over tensor-parallel ranks."""
    config = SSEHConfig.from_preset("sse-h-2b", expand_v=0.5)
    assert config.sse_state_shape() == (5, 10, 256, 128)
    assert config.sse_state_shape(tp_size=2) == (5, 5, 256, 128)
    with pytest.raises(ValueError, match=r"num_heads \(10\) divisible by the tensor-parallel size \(4\)"):
        config.sse_state_shape(tp_size=4)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_writer", 5, "num_writer"),
    ("num_reader", 2, "num_reader"),
    ("attn_layers", [1, 4], "attn_layers"),
    ("head_dim", 0, "head_dim"),
    ("expand_v", 0.3, "expand_v"),
    ("attn_num_kv_heads", 3, "attn_num_kv_heads"),
    ("attn_head_dim", 33, "attn_head_dim"),
    ("layer_types", ["linear_attention"] * 4, "layer_types"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_fields_raise_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SSEHConfig.from_preset("sse-h-tiny", **{field: value})


def test_save_load_round_trip(tmp_path) -> None:
    config = SSEHConfig.from_preset("sse-h-tiny", eos_token_id=2, pad_token_id=0)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SSEHConfig)
    assert without_path(loaded) == without_path(config)
    assert loaded.num_attention_heads == config.attn_num_heads  # HF alias
