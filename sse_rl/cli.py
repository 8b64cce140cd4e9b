"""`sse-rl`: the command line.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only maps names to modules, so that
`sse-rl --help` stays fast (nothing heavy is imported until a command runs). A recipe a command refuses
(`RecipeError`, raised before anything is written) is a user's mistake, not a bug: its message, exit status 2, no
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> ("module:function", one-line help). The function takes the remaining argv and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "env": ("sse_rl.env_report:main", "print versions, devices and whether vLLM / Triton / a GPU are usable"),
    "init-model": ("sse_rl.model_cli:init_model_main", "write a randomly initialised checkpoint (+ tokenizer)"),
    "generate": ("sse_rl.model_cli:generate_main", "generate text from a checkpoint with the HF model"),
    "sft": ("sse_rl.sft:main", "supervised fine-tuning from a recipe (TRL SFTTrainer, packed, completion-only loss)"),
    "train": ("sse_rl.train:main", "GRPO from a recipe: vLLM rollouts, sandboxed rewards, SSE-H updates, on Ray"),
    "eval": ("sse_rl.eval.cli:main", "evaluate on AIME24/AIME25/MATH-500 (avg@k, pass@k, maj@k), or --compare runs"),
    "rewards": ("sse_rl.rewards.cli:main", "check the math grader against a peer-graded file, or grade one completion"),
    "convert": ("sse_rl.models.convert:main", "convert an fla SSE checkpoint (model_type 'sse') to SSE-H"),
    "hybridize": ("sse_rl.models.hybridize:main", "convert a Llama/Qwen2/Qwen3 Transformer into SSE-H (kept "
                  "attention layers, SSE layers from the attention weights)"),
    "distill": ("sse_rl.distill:main", "distil a Transformer teacher into an SSE-H student: layer alignment, then "
                "logit KL (TRL)"),
    "export": ("sse_rl.export:main", "a run's policy as a Hugging Face folder with its model code and a model card; "
               "--push-to-hub REPO_ID uploads it"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sse-rl",
        description="GRPO post-training of SSE-H models: rollouts in vLLM, math rewards, Ray orchestration.",
        epilog="Run `sse-rl COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from: {', '.join(COMMANDS)}")
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    from sse_rl.config import RecipeError

    try:
        return int(func(rest) or 0)
    except RecipeError as err:
        print(f"sse-rl {name}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
