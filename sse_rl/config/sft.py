"""The SFT recipe (`sse-rl sft`): its schema and the constraints between its fields.

`model` is the GRPO recipe's section, so `model.init` builds the tokenizer and random policy exactly as `sse-rl train`
does; the data section is the one the distillation recipe extends.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sse_rl.config.grpo import ModelConfig, adam_betas_rule, required_rules
from sse_rl.config.reading import TrackerName, bounded


@dataclass
class SFTDataConfig:
    train: str = ""  # HF hub id, a local .jsonl / .parquet file, or "pkg.mod:fn" called as fn(split)
    train_split: str = "train"  # split of a hub dataset `train` reads
    subset: str = ""  # HF dataset config name, if the hub dataset has several
    # str.format over the row's columns (dotted paths into nested ones); one field holding chat messages (TRL's
    # conversational "prompt") is the prompt as written. The same template GRPO uses.
    prompt_template: str = "{problem}"
    response_column: str = "solution"  # the completion the model learns: text, or chat messages
    # whole-example rows: this column (text, or chat messages like TRL's "messages") is the whole example (a TRL
    # language-modeling row, loss on every token);
    # "" = prompt/completion rows from prompt_template and response_column
    text_column: str = ""
    chat_template: bool = True  # prompt as a user turn, response as the assistant turn (tokenizer's template)
    system_prompt: str = ""  # the system turn before every chat prompt (chat_template on, or chat-message prompts)
    max_rows: int = bounded(0, ge=0)  # use the first N rows; 0 = all
    num_proc: int = bounded(1, ge=1)  # processes that tokenize and pack the dataset


@dataclass
class SFTTrainConfig:
    steps: int = bounded(0, ge=0)  # optimizer steps; 0 = `epochs` passes over the data
    epochs: float = bounded(1.0, gt=0)  # passes over the data when steps is 0
    lr: float = bounded(3e-4, gt=0)  # AdamW peak learning rate
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"  # after warm-up
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up steps
    weight_decay: float = bounded(0.0, ge=0)  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    max_grad_norm: float = bounded(1.0, gt=0)  # gradient clipping by global norm
    token_budget: int = bounded(4096, ge=8)  # tokens per packed micro-batch (longer sequences are truncated)
    batch_tokens: int = bounded(65536, ge=8)  # tokens per optimizer step: a multiple of token_budget
    seed: int = 0  # data order and initialisation seed


@dataclass
class SFTRunConfig:
    logging_steps: int = bounded(10, ge=1)  # metrics every N steps (sft_metrics.jsonl)
    save_steps: int = bounded(200, ge=0)  # checkpoint every N steps (for resume); 0 = only OUT_DIR/final
    keep_checkpoints: int = bounded(2, ge=1)  # newest checkpoints kept; older ones are deleted
    # Trackers TRL reports to (its report_to): tensorboard, wandb, trackio, mlflow; [] = none
    report_to: list[TrackerName] = field(default_factory=list)
    progress: bool = True  # progress bar on stderr


@dataclass
class SFTRecipe:
    """An SFT recipe (`sse-rl sft`); `model` is the GRPO recipe's section, so `model.init` builds the tokenizer and
    random policy exactly as `sse-rl train` does."""

    out_dir: str = ""  # the run directory: config.yaml, metrics, checkpoints, final/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    run: SFTRunConfig = field(default_factory=SFTRunConfig)


def batch_tokens_rule(key: str, batch_tokens: int, token_budget: int) -> list[str]:
    """An optimizer step accumulates whole micro-batches (SFT and distillation)."""
    if batch_tokens % token_budget:
        return [f"{key}.batch_tokens: {batch_tokens} must be a multiple of {key}.token_budget ({token_budget}), "
                "the tokens of one micro-batch"]
    return []


def sft_data_rules(data: SFTDataConfig) -> list[str]:
    """The constraints between the data fields of an SFT or distillation recipe."""
    if data.system_prompt and data.text_column:
        return ["data.system_prompt: set, but data.text_column rows are whole examples without a prompt; the system "
                "prompt goes before prompt_template's prompts"]
    return []


def sft_rules(recipe: SFTRecipe) -> list[str]:
    """The constraints between an SFT recipe's fields."""
    t = recipe.train
    errors = required_rules(recipe.out_dir, recipe.data.train, recipe.model)
    errors += batch_tokens_rule("train", t.batch_tokens, t.token_budget)
    errors += adam_betas_rule("train.adam_betas", t.adam_betas)
    errors += sft_data_rules(recipe.data)
    if recipe.model.checkpoint_every != 1:
        errors.append(f"model.checkpoint_every: {recipe.model.checkpoint_every}, but SFT (TRL) recomputes every block "
                      "under model.gradient_checkpointing; only the GRPO trainer takes checkpoint_every")
    return errors
