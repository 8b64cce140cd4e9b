"""Small byte-level BPE tokenizers for tests and CPU smoke runs (real runs use a hub tokenizer, e.g. Qwen's).

Byte-level BPE encodes any text and decodes it back exactly. Special tokens follow the Qwen chat convention:
<|endoftext|> (padding / document end), <|im_start|> / <|im_end|> (chat turns; <|im_end|> is the EOS token),
<think> / </think> (reasoning spans). Training is deterministic: the same texts give the same tokenizer.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of `vocab_size` tokens on `texts` and save it to `out_dir`."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                         f"got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        additional_special_tokens=SPECIAL_TOKENS[1:],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_corpus() -> list[str]:
    """A built-in math-flavoured corpus: digits, operators, words, LaTeX and \\boxed{} answers, chat markup."""
    words = ("Let us compute the sum product difference of and then so the answer is We find that "
             "Therefore Solve for x in equation Find value integer number prime square root fraction "
             "remainder when divided by What is How many Simplify Evaluate").split()
    texts = [" ".join(words)]
    for a in range(0, 60, 3):
        for b in range(1, 40, 7):
            texts.append(f"What is {a} + {b}? <think>{a} + {b} = {a + b}</think> The answer is \\boxed{{{a + b}}}.")
            texts.append(f"Compute {a} \\times {b} - {b}. We get ${a * b - b}$, so \\boxed{{{a * b - b}}}.")
            texts.append(f"Solve $x^2 = {a * a}$ for x >= 0: x = \\sqrt{{{a * a}}} = {a}. \\frac{{{a}}}{{{b}}}")
    texts.append("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n<think>2 + 2 = 4</think> "
                 "\\boxed{4}<|im_end|>\n<|endoftext|>")
    return texts


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the tiny test tokenizer on `tiny_corpus()` and save it to `out_dir`."""
    return train_tokenizer(tiny_corpus(), out_dir, vocab_size=vocab_size)
