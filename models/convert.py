"""Convert the authors' fla checkpoints (model_type "sse", fla PR #882 `SSEForCausalLM`) to SSE-H.

Parameter names are the same by design (layers.py uses fla's module names), so the state dict maps over
unchanged except for non-parameter buffers (`rotary.inv_freq`), which are dropped. The config maps as:
  fla `attn = {layers, num_heads, num_kv_heads, rope_theta, ...}` -> `attn_layers`, `attn_num_heads`,
  `attn_num_kv_heads`, `rope_theta`, and `attn_head_dim = hidden_size // attn.num_heads` (fla's rule);
  other fields of the same name are copied. Options this model does not implement (short conv, GDN mixers,
  GVA value heads, q softmax, qkv bias, sliding windows, num_writer != num_reader) raise instead of being
  silently dropped.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from sse_rl.models.configuration import SSEHConfig
from sse_rl.models.modeling import SSEHForCausalLM
from torch import Tensor

# fla SSEConfig fields copied verbatim into SSEHConfig.
SAME_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "expand_v", "num_sparse_partition",
    "num_writer", "num_reader", "use_output_gate", "aux_loss_coef", "hidden_ratio", "intermediate_size", "norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "initializer_range", "pad_token_id", "bos_token_id",
    "eos_token_id",
)
# fla options that change the math, with the only value this model implements.
REQUIRED = {"linear_attn_type": "gla", "use_short_conv": False, "num_v_heads": None, "use_q_softmax": False,
            "use_k_softmax": True, "hidden_act": "swish"}
REQUIRED_ATTN = {"qkv_bias": False, "qk_norm": False, "window_size": None}
DROPPED_SUFFIXES = ("rotary.inv_freq",)


def convert_fla_config(fla: dict[str, Any]) -> SSEHConfig:
    """SSEHConfig from the dict of an fla `SSEConfig` (config.json with model_type "sse")."""
    if fla.get("model_type") != "sse":
        raise ValueError(f"expected an fla SSE config (model_type 'sse'), got model_type={fla.get('model_type')!r}")
    for key, want in REQUIRED.items():
        if fla.get(key, want) != want:
            raise ValueError(f"fla config has {key}={fla[key]!r}; only {key}={want!r} is supported")
    fields = {k: fla[k] for k in SAME_FIELDS if k in fla}
    attn = fla.get("attn")
    if attn:
        for key, want in REQUIRED_ATTN.items():
            if attn.get(key, want) != want:
                raise ValueError(f"fla config has attn.{key}={attn[key]!r}; only {want!r} is supported")
        heads = attn["num_heads"]
        fields.update(attn_layers=list(attn["layers"]), attn_num_heads=heads,
                      attn_num_kv_heads=attn.get("num_kv_heads") or heads,
                      attn_head_dim=fla["hidden_size"] // heads, rope_theta=float(attn.get("rope_theta", 10000.0)))
    return SSEHConfig(**fields)


def convert_fla_state_dict(state_dict: dict[str, Tensor], config: SSEHConfig) -> dict[str, Tensor]:
    """Map an fla SSE state dict onto SSEHForCausalLM's names; raises on missing or unknown parameters."""
    converted = {k: v for k, v in state_dict.items() if not k.endswith(DROPPED_SUFFIXES)}
    with torch.device("meta"):
        expected = set(SSEHForCausalLM(config).state_dict())
    if config.tie_word_embeddings:
        converted.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unknown = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unknown:
        raise ValueError(f"fla checkpoint does not match the SSE-H layout: missing {missing[:8]}, "
                         f"unknown {unknown[:8]}")
    return converted


def load_fla_weights(src: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (*.safetensors shards, else pytorch_model*.bin)."""
    files = sorted(src.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    files = sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {src}")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def convert_fla_checkpoint(src_dir: str | Path, out_dir: str | Path) -> SSEHForCausalLM:
    """Convert an fla SSE checkpoint directory to an SSE-H one (weights, config, tokenizer files copied)."""
    src, out = Path(src_dir), Path(out_dir)
    config = convert_fla_config(json.loads((src / "config.json").read_text()))
    state_dict = convert_fla_state_dict(load_fla_weights(src), config)
    model = SSEHForCausalLM(config)
    model.load_state_dict(state_dict, strict=not config.tie_word_embeddings)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                 "tokenizer.model", "chat_template.jinja", "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sse-rl convert", description="Convert an fla SSE checkpoint to SSE-H.")
    parser.add_argument("src", help="fla checkpoint directory (config.json with model_type 'sse' + weights)")
    parser.add_argument("out", help="output directory")
    args = parser.parse_args(argv)
    convert_fla_checkpoint(args.src, args.out)
    print(f"wrote SSE-H checkpoint to {args.out}")
    return 0
