"""`--dry-run` of `sse-rl train|sft|distill`: the recipe checked as the run checks it, then the first rows of its
training data as the run will see them, printed; nothing is written and neither Ray nor vLLM starts.

The checks are `validate`'s (keys, types, files, models, tokenizers, and for GRPO every reward called once on the
first row); what this adds is the data a user most often gets wrong, shown: the prompt a template renders, the chat
turns, the answer the rewards receive, the completion SFT trains on.
"""
from __future__ import annotations

import json
from typing import Any

from sse_rl.config import DistillRecipe, Recipe, SFTRecipe
from sse_rl.data import prompt_rows, read_rows, sft_examples

ROWS = 3  # rows shown
WIDTH = 400  # characters shown of one value


def report(recipe: Recipe | SFTRecipe | DistillRecipe) -> str:
    """What a dry run prints for a recipe that passed `validate`."""
    d = recipe.data
    rows = read_rows(d.train, d.train_split, d.subset)[:ROWS]
    if isinstance(recipe, Recipe):
        shown = [_prompt(p) for p in prompt_rows(rows, d.train, template=d.prompt_template,
                                                 answer_column=d.answer_column, system_prompt=d.system_prompt,
                                                 chat_template=d.chat_template, drop_incomplete=d.drop_incomplete)]
        rewards = ", ".join(fn.spec for fn in recipe.reward.functions)
        checked = f"recipe checked; every reward called once on the first row ({rewards})"
    else:
        shown = sft_examples(rows, d, d.train)
        checked = "recipe checked"
    lines = [f"{checked}; the first {len(shown)} rows of data.train ({d.train}) as the run sees them:"]
    lines += [f"  row {i}: {_clip(json.dumps(row, ensure_ascii=False, default=str))}" for i, row in enumerate(shown)]
    lines.append(f"dry run: nothing written; the run would write to {recipe.out_dir}")
    return "\n".join(lines)


def _prompt(prompt: Any) -> dict[str, Any]:
    """A prompt as the rewards and the engine get it: its chat turns or text, and the answer column."""
    return {"prompt": prompt.messages if prompt.messages is not None else prompt.text,
            "answer": prompt.columns["answer"]}


def _clip(text: str) -> str:
    return text if len(text) <= WIDTH else text[:WIDTH] + f"... ({len(text)} characters)"

