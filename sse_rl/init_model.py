"""Write a randomly initialised checkpoint (safetensors + config + tokenizer), and sample from a checkpoint.

Presets are SSE-H sizes (`SSEHConfig.preset_names()`) or small dense Transformers (`TRANSFORMER_PRESETS`): the
teachers that tests and demos train with `sse-rl sft` and then convert with `sse-rl hybridize`, one per converted
family (Llama; Qwen2 with q/k/v bias and GQA; Qwen3 with q/k-norm, GQA and tied embeddings).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedConfig, Qwen2Config, Qwen3Config

from sse_rl.models import SSEHConfig, SSEHForCausalLM
from sse_rl.models.configuration import PRESETS as PRESETS_SSE_H

# Transformer preset -> (config class, fields). Attention head_dim 32 or more: vLLM CPU rejects 16.
_TINY = {"vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384,
         "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}
TRANSFORMER_PRESETS: dict[str, tuple[type[PreTrainedConfig], dict[str, Any]]] = {
    "llama-tiny": (LlamaConfig, {**_TINY, "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32,
                                 "tie_word_embeddings": False}),
    "qwen2-tiny": (Qwen2Config, {**_TINY, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "tie_word_embeddings": False}),
    "qwen3-tiny": (Qwen3Config, {**_TINY, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                                 "tie_word_embeddings": True}),
    # 97.1M parameters with a 1024-token vocabulary: the one-GPU conversion demo's teacher (Qwen3 shape).
    "qwen3-100m": (Qwen3Config, {"vocab_size": 1024, "hidden_size": 768, "num_hidden_layers": 14,
                                 "num_attention_heads": 12, "num_key_value_heads": 4, "head_dim": 64,
                                 "intermediate_size": 2304, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                                 "tie_word_embeddings": True}),
}


def preset_names() -> list[str]:
    """Every preset `init_model` builds: SSE-H sizes, then Transformer teachers."""
    return SSEHConfig.preset_names() + sorted(TRANSFORMER_PRESETS)


def preset_config(preset: str, **overrides: Any) -> PreTrainedConfig:
    """The config of an SSE-H or Transformer preset, with `overrides` replacing its fields."""
    if preset in TRANSFORMER_PRESETS:
        cls, fields = TRANSFORMER_PRESETS[preset]
        return cls(**{**fields, **overrides})
    if preset not in PRESETS_SSE_H:
        raise ValueError(f"unknown preset {preset!r}; choose from {preset_names()}")
    return SSEHConfig.from_preset(preset, **overrides)


def init_model(preset: str, out_dir: str | Path, tokenizer: str | None = None, seed: int = 0,
               **overrides: Any) -> int:
    """Build `preset` (an SSE-H or Transformer preset) with its random initialisation, save it to `out_dir` and
    return its parameter count.

    tokenizer: a local directory or hub id; when given, the vocabulary size and special token ids follow it and
    the tokenizer is saved beside the weights. `overrides` replace preset fields (they win over the tokenizer's).
    """
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
        overrides = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, **overrides}
    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = SSEHForCausalLM(config) if isinstance(config, SSEHConfig) else AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tok.save_pretrained(str(out_dir))
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {preset} ({count:,} parameters) to {out_dir}")
    return count


def generate_sample(model_dir: str | Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of `prompt` with the HF model (CPU or the default device); returns the new text."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
