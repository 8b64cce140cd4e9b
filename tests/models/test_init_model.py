"""The tiny tokenizer and `init_model`: a loadable checkpoint with its tokenizer, and `generate_sample`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sse_rl.init_model import generate_sample, init_model
from sse_rl.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(path)
    return str(path)


def test_tokenizer_round_trips_text_and_keeps_special_tokens(tokenizer_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 512
    text = "Find $x$: 12 + 7 = \\boxed{19}. Ünïcödé ∑ 😀\n\ttabs"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()), "BPE merges must shorten math text"
    for special in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id and len(tok(special)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_training_is_deterministic(tmp_path, tokenizer_dir: str) -> None:
    again = build_tiny_tokenizer(tmp_path / "again")
    first = json.loads((tmp_path / "again" / "tokenizer.json").read_text())
    original = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    assert first["model"]["merges"] == original["model"]["merges"]
    assert len(again) == 512
    with pytest.raises(ValueError, match="vocab_size must be >= 261"):
        train_tokenizer(["abc"], tmp_path / "small", vocab_size=100)


def test_init_model_writes_a_loadable_checkpoint(tmp_path, tokenizer_dir: str, capsys) -> None:
    out = tmp_path / "model"
    count = init_model("sse-h-tiny", out, tokenizer=tokenizer_dir, seed=3, num_hidden_layers=2, attn_layers=[1])
    assert f"{count:,} parameters" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.config.vocab_size == len(tok) and model.config.eos_token_id == tok.eos_token_id
    assert model.config.num_hidden_layers == 2
    # Same seed, same weights; the weights follow normal(0, 0.02).
    init_model("sse-h-tiny", tmp_path / "again", seed=3, num_hidden_layers=2, attn_layers=[1], vocab_size=512)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert abs(model.lm_head.weight.std().item() - 0.02) < 0.002
    text = generate_sample(out, "What is 1 + 2?", max_new_tokens=5)
    assert isinstance(text, str) and len(tok(text)["input_ids"]) >= 1
