"""The toy task of the tiny CPU recipe: the largest of three digits, e.g. "max(3,7,1)=" -> "7".

Why this task: a random tiny SSE-H policy answers it by chance (about 1 in 19 with a 19-token vocabulary), so
rewards are rare but not absent at step 0, and GRPO lifts the held-out reward past 0.8 within a few dozen steps
on two CPU cores. It needs a comparison across three positions, so it is learned, not copied, and the held-out
prompts (200 of the 1000 triples) never appear in training.

Pieces, each reached through the recipe the way a user's own task would be:
- `rows(split)`: the data source `sse_rl.tasks.max_digit:rows` ("train" / "test" splits, columns `problem`, `answer`);
- `build_tokenizer(out_dir)`: a character-level tokenizer
  (`model.init.tokenizer: sse_rl.tasks.max_digit:build_tokenizer`);
- `max_digit_reward`: the reward, registered as `sse_rl.tasks.max_digit:max_digit_reward` through the reward
  plug-in API.
"""
from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

PAD, EOS = "<|endoftext|>", "<|im_end|>"
CHARS = list("0123456789") + list("max(),=")
EVAL_SIZE = 200


def rows(split: str) -> list[dict[str, str]]:
    """All 1000 digit triples in a fixed shuffled order: the first 200 are "test", the other 800 "train"."""
    triples = list(itertools.product(range(10), repeat=3))
    random.Random(1234).shuffle(triples)
    chosen = {"test": triples[:EVAL_SIZE], "train": triples[EVAL_SIZE:]}
    if split not in chosen:
        raise ValueError(f"toy task split must be 'train' or 'test', got {split!r}")
    return [{"problem": f"max({a},{b},{c})=", "answer": str(max(a, b, c))} for a, b, c in chosen[split]]


def build_tokenizer(out_dir: str | Path) -> str:
    """Write a character-level tokenizer (19 tokens: PAD, EOS, digits, `max(),=`) to `out_dir`; return the dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, EOS, *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD,
                                        clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def max_digit_reward(prompts: list[Any], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion starts with the right digit, else 0.0 (TRL reward signature).

    >>> max_digit_reward(["max(3,7,1)="] * 3, ["7", "7<|im_end|>", "3"], answer=["7"] * 3)
    [1.0, 1.0, 0.0]
    """
    return [float(c.strip()[:1] == a) for c, a in zip(completions, answer)]
