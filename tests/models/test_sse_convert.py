"""Converting an fla-format SSE checkpoint (model_type "sse", nested `attn` dict) to SSE-H."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from sse_rl.models import SSEHForCausalLM
from sse_rl.models.convert import convert_fla_checkpoint, convert_fla_config, convert_fla_state_dict


def fla_config(**changes: object) -> dict:
    """A small config.json as fla's SSEConfig writes it."""
    config = {
        "model_type": "sse", "architectures": ["SSEForCausalLM"], "attn_mode": "chunk", "linear_attn_type": "gla",
        "sse_implementation": "varlen", "hidden_size": 128, "num_hidden_layers": 3, "num_heads": 2, "head_dim": 64,
        "expand_v": 1.0, "num_v_heads": None, "num_sparse_partition": 4, "num_writer": 1, "num_reader": 1,
        "use_output_gate": True, "use_short_conv": False, "conv_size": 4, "aux_loss_coef": 0.01, "hidden_ratio": 4,
        "intermediate_size": None, "hidden_act": "swish", "norm_eps": 1e-6, "max_position_embeddings": 2048,
        "vocab_size": 300, "tie_word_embeddings": False, "initializer_range": 0.02, "fuse_norm": True,
        "fuse_swiglu": True, "fuse_cross_entropy": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "attn": {"layers": [1], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": False, "window_size": None,
                 "rope_theta": 500000.0},
    }
    config.update(changes)
    return config


def fla_state_dict(config: dict) -> dict[str, torch.Tensor]:
    """Random weights under fla's parameter names, built independently of our model, plus fla's rotary buffer."""
    d, h, dk, n, ffn, vocab = 128, 2, 64, 4, 512, config["vocab_size"]
    heads, kv_heads = config["attn"]["num_heads"], config["attn"]["num_kv_heads"]
    shapes = {"model.embeddings.weight": (vocab, d), "model.norm.weight": (d,), "lm_head.weight": (vocab, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,), p + "mlp.gate_proj.weight": (ffn, d),
                   p + "mlp.up_proj.weight": (ffn, d), p + "mlp.down_proj.weight": (d, ffn)}
        a = p + "attn."
        if i in config["attn"]["layers"]:
            hd = d // heads
            shapes |= {a + "q_proj.weight": (d, d), a + "k_proj.weight": (kv_heads * hd, d),
                       a + "v_proj.weight": (kv_heads * hd, d), a + "o_proj.weight": (d, d)}
            shapes[a + "rotary.inv_freq"] = (hd // 2,)
            continue
        shapes |= {a + "q_proj.weight": (h * dk, d), a + "k_proj.weight": (h * dk, d), a + "v_proj.weight": (h * dk, d),
                   a + "e_proj.weight": (n, d), a + "o_norm.weight": (dk,), a + "o_proj.weight": (d, h * dk)}
        for lr in ("lora_q_proj", "lora_k_proj", "g_proj"):
            shapes |= {a + f"{lr}.0.weight": (dk, d), a + f"{lr}.1.weight": (h * dk, dk)}
        for j in (0, 1):
            shapes |= {a + f"gk_proj.{j}.0.weight": (16, d), a + f"gk_proj.{j}.1.weight": (h * dk, 16),
                       a + f"gk_proj.{j}.1.bias": (h * dk,)}
    return {k: torch.randn(s) * 0.05 for k, s in shapes.items()}


def test_config_mapping() -> None:
    config = convert_fla_config(fla_config())
    assert config.model_type == "sse_h"
    assert (config.attn_layers, config.attn_num_heads, config.attn_num_kv_heads) == ([1], 4, 2)
    assert config.attn_head_dim == 32 and config.rope_theta == 500000.0  # fla: hidden_size // attn.num_heads
    assert (config.num_heads, config.head_dim, config.vocab_size, config.eos_token_id) == (2, 64, 300, 2)
    assert config.intermediate_size == 512


@pytest.mark.parametrize(("changes", "message"), [
    ({"model_type": "gla"}, "model_type"),
    ({"use_short_conv": True}, "use_short_conv"),
    ({"linear_attn_type": "gdn"}, "linear_attn_type"),
    ({"num_v_heads": 4}, "num_v_heads"),
    ({"attn": {"layers": [1], "num_heads": 4, "window_size": 512}}, "attn.window_size"),
], ids=["model_type", "short_conv", "gdn", "gva", "window"])
def test_unsupported_fla_options_raise(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        convert_fla_config(fla_config(**changes))


def test_state_dict_mapping_rejects_mismatches() -> None:
    config_dict = fla_config()
    config = convert_fla_config(config_dict)
    weights = fla_state_dict(config_dict)
    converted = convert_fla_state_dict(weights, config)
    assert not any(k.endswith("inv_freq") for k in converted)
    broken = dict(weights)
    broken["model.layers.0.attn.extra.weight"] = broken.pop("model.layers.0.attn.e_proj.weight")
    with pytest.raises(ValueError, match="missing .*e_proj.*unknown .*extra"):
        convert_fla_state_dict(broken, config)


def test_checkpoint_converts_and_loads(tmp_path) -> None:
    src, out = tmp_path / "fla", tmp_path / "ours"
    src.mkdir()
    config_dict = fla_config()
    (src / "config.json").write_text(json.dumps(config_dict))
    weights = fla_state_dict(config_dict)
    save_file(weights, str(src / "model.safetensors"))
    convert_fla_checkpoint(src, out)
    model = SSEHForCausalLM.from_pretrained(out).eval()
    state = model.state_dict()
    for name, tensor in weights.items():
        if not name.endswith("inv_freq"):
            assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 10))).logits).all()
