"""The HF reference of the attention options for converted Transformers (`layers.Attention`: q/k/v bias, o bias,
q/k-norm, scaled RoPE) against transformers' own attention modules given the same weights, fp32."""
from __future__ import annotations

import pytest
import torch
from sse_rl.models.layers import Attention
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

ATOL = 1e-5
SHAPE = {"hidden_size": 128, "num_attention_heads": 4, "head_dim": 32, "max_position_embeddings": 512,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# (teacher config class, its attention and rotary modules, config fields, the options layers.Attention needs)
CASES = {
    # Llama with attention_bias: bias on q/k/v and o; Llama 3 RoPE.
    "llama-bias-llama3": (LlamaConfig, LlamaAttention, LlamaRotaryEmbedding,
                          {"num_key_value_heads": 4, "attention_bias": True, "rope_parameters": LLAMA3},
                          {"qkv_bias": True, "o_bias": True}),
    # Qwen2: q/k/v bias only, GQA; linear RoPE scaling.
    "qwen2-qkv-bias-linear": (Qwen2Config, Qwen2Attention, Qwen2RotaryEmbedding,
                              {"num_key_value_heads": 2, "rope_parameters": {"rope_type": "linear", "factor": 4.0}},
                              {"qkv_bias": True}),
    # Qwen3: q/k-norm before RoPE, GQA; YaRN (explicit original length, cos/sin factor from mscale/mscale_all_dim).
    "qwen3-qk-norm-yarn": (Qwen3Config, Qwen3Attention, Qwen3RotaryEmbedding,
                           {"num_key_value_heads": 2, "rope_parameters": {
                               "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "mscale": 1.0, "mscale_all_dim": 0.5}},
                           {"qk_norm": True}),
    "qwen3-qk-norm-default": (Qwen3Config, Qwen3Attention, Qwen3RotaryEmbedding, {"num_key_value_heads": 2},
                              {"qk_norm": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_transformers(case):
    config_cls, attention_cls, rotary_cls, fields, options = CASES[case]
    config = config_cls(**SHAPE, **fields, attn_implementation="sdpa")
    teacher = attention_cls(config, layer_idx=0).eval()
    with torch.no_grad():  # biases come non-zero from nn.Linear's init; make the q/k-norm weights non-trivial too
        for name, param in teacher.named_parameters():
            if "norm" in name:
                param.add_(0.5 * torch.randn_like(param))
    scaling = {k: v for k, v in config.rope_parameters.items() if k != "rope_theta"}
    ours = Attention(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                     config.rope_parameters["rope_theta"], norm_eps=config.rms_norm_eps, rope_scaling=scaling,
                     max_position_embeddings=config.max_position_embeddings, **options).eval()
    ours.load_state_dict(teacher.state_dict(), strict=True)  # same names; every teacher parameter has a place

    # Positions past original_max_position_embeddings (64), where the scalings change the rotation angles.
    x = torch.randn(2, 200, config.hidden_size)
    position_ids = torch.arange(100, 300)[None].expand(2, -1)
    with torch.no_grad():
        expected, _ = teacher(x, rotary_cls(config)(x, position_ids), attention_mask=None)
        got = ours(x, position_ids)
    diff = (got - expected).abs().max().item()
    assert diff <= ATOL, f"{case}: max |layers.Attention - transformers| = {diff:.2e}"
    assert expected.abs().max() > 0.1  # not a vacuous comparison


def test_options_change_the_output():
    """Each option reaches the output: dropping the o bias, the q/k-norm weights or the RoPE scaling changes it."""
    torch.manual_seed(0)
    full = Attention(128, 4, 2, 32, 10000.0, qkv_bias=True, o_bias=True, qk_norm=True, rope_scaling=LLAMA3).eval()
    with torch.no_grad():
        full.q_norm.weight.add_(0.5 * torch.randn(32))
    x, position_ids = torch.randn(1, 200, 128), torch.arange(200)[None]
    variants = {"no o bias": {"o_bias": False}, "no qk norm": {"qk_norm": False}, "plain rope": {"rope_scaling": None},
                "no qkv bias": {"qkv_bias": False}}
    with torch.no_grad():
        reference = full(x, position_ids)
        for label, change in variants.items():
            kwargs = {"qkv_bias": True, "o_bias": True, "qk_norm": True, "rope_scaling": LLAMA3, **change}
            variant = Attention(128, 4, 2, 32, 10000.0, **kwargs).eval()
            variant.load_state_dict(full.state_dict(), strict=False)
            assert (variant(x, position_ids) - reference).abs().max() > 1e-3, label
