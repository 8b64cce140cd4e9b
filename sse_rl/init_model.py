"""Write a randomly initialised SSE-H checkpoint (safetensors + config + tokenizer), and sample from a checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sse_rl.models import SSEHConfig, SSEHForCausalLM


def init_model(preset: str, out_dir: str | Path, tokenizer: str | None = None, seed: int = 0,
               **overrides: Any) -> int:
    """Build `preset` with normal(0, initializer_range) weights, save it to `out_dir` and return its parameter count.

    tokenizer: a local directory or hub id; when given, the vocabulary size and special token ids follow it and
    the tokenizer is saved beside the weights. `overrides` replace preset fields (they win over the tokenizer's).
    """
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer)
        overrides = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                     "bos_token_id": tok.bos_token_id, **overrides}
    config = SSEHConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = SSEHForCausalLM(config)
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
