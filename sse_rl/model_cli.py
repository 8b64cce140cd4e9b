"""`sse-rl init-model` and `sse-rl generate`: build a random SSE-H checkpoint, and sample from one."""
from __future__ import annotations

import argparse


def init_model_main(argv: list[str] | None = None) -> int:
    from sse_rl.init_model import init_model, preset_names

    parser = argparse.ArgumentParser(prog="sse-rl init-model", description=__doc__)
    parser.add_argument("--preset", required=True, choices=preset_names(),
                        help="SSE-H size, or a small Transformer teacher (llama-/qwen2-/qwen3-tiny, qwen3-100m)")
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or HF hub id (sets the vocab size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = parser.parse_args(argv)
    init_model(args.preset, args.out, tokenizer=args.tokenizer, seed=args.seed)
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    from sse_rl.init_model import generate_sample

    parser = argparse.ArgumentParser(prog="sse-rl generate", description=__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory (with a tokenizer)")
    parser.add_argument("--prompt", default="1 + 2 =", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    print(generate_sample(args.model, args.prompt, args.max_new_tokens))
    return 0
