"""`sse-rl sft RECIPE.yaml [key=value ...]`: supervised fine-tuning of an SSE-H policy with TRL's SFTTrainer.

The warm-up before GRPO: the model learns the answer format (and, on a synthetic task, the skill) from worked
solutions, and its final checkpoint is where `sse-rl train` (model.path=OUT_DIR/final) and `sse-rl eval` start.

Choices:
1) Config is data: `sse_rl.config.SFTRecipe`, checked by `config.validate` before anything is written (unknown
   keys, bad values, missing data or policy, benchmark data: all reported at once, each naming its key); `model` is
   the GRPO recipe's section, so `model.init` builds the tokenizer and random policy exactly as `sse-rl train` does.
2) Rows become TRL examples in TRL's own formats (`sse_rl.data.sft_examples`), so TRL applies the chat template:
   prompt-completion rows, the prompt being `data.prompt_template` over the row (chat messages as written when the
   template is one field holding them, as a user turn under `data.chat_template`, after `data.system_prompt`: the
   way GRPO renders prompts), the completion `data.response_column` (messages, or text as the assistant turn).
   Loss is on completion tokens only. With `data.text_column`, rows are whole examples instead (TRL
   language-modeling examples: text, EOS appended by TRL, or a conversation of chat messages) and the loss covers
   every token.
3) Sequences are packed (best-fit decreasing) into rows of `train.token_budget` tokens, padding-free: the collator
   concatenates them with positions restarting at 0, from which SSE-H derives the sequence bounds (`cu_seqlens`),
   so no state or attention crosses a boundary, and the first token of every sequence has no label.
4) The SSE router's balance loss (`config.aux_loss_coef`) is added to TRL's loss (`SSEHSFTTrainer`).
5) OUT_DIR holds TRL checkpoints (checkpoint-N, resumed automatically), sft_metrics.jsonl, sft_loss.png, and the
   HF checkpoint OUT_DIR/final (weights, config, tokenizer with its chat template).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainerState
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from sse_rl import dry_run
from sse_rl.config.describe import recipe_parser
from sse_rl.config import SFTDataConfig, SFTRecipe, parse_recipe, validate, write_recipe

logger = logging.getLogger("sse_rl.sft")
METRICS_FILE, LOSS_PNG, FINAL_DIR = "sft_metrics.jsonl", "sft_loss.png", "final"


def build_examples(data: SFTDataConfig, tokenizer: Any) -> list[dict[str, Any]]:
    """TRL examples of the training rows; a row missing a column fails naming row and column."""
    from sse_rl.data import read_rows

    rows = read_rows(data.train, data.train_split, data.subset)
    if data.max_rows:
        rows = rows[:data.max_rows]
    if not rows:
        raise ValueError(f"data.train: {data.train} (split {data.train_split!r}) has no rows")
    return rows_to_examples(rows, data, tokenizer, data.train)


def rows_to_examples(rows: list[dict[str, Any]], data: SFTDataConfig, tokenizer: Any, source: str,
                     key: str = "data.train") -> list[dict[str, Any]]:
    """Rows as TRL examples (`sse_rl.data.sft_examples`); conversational ones need the tokenizer's chat template.
    Errors name the recipe `key` and `source` the rows came from."""
    from sse_rl.data import sft_examples

    examples = sft_examples(rows, data, source, key)
    chat = any(isinstance(value, list) for value in examples[0].values())
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{key}: the examples are chat messages but the tokenizer has no chat template; set "
                         "data.chat_template=false for text prompts")
    return examples


class SSEHSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer plus SSE-H's router balance loss.

    TRL's fused LM head runs the backbone (`model.model`) itself and builds the loss from the log-probabilities, so
    the aux term the model's own forward would add is dropped; a forward hook on the backbone catches the aux loss
    and it is added the way TRL adds MoE aux losses (divided over the accumulation steps when TRL normalises the
    token loss by the whole batch).
    """

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        unwrapped = self.accelerator.unwrap_model(model)
        coef = getattr(unwrapped.config, "aux_loss_coef", 0.0)  # 0 for a Transformer (a teacher being trained)
        if not coef:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        caught: list[torch.Tensor] = []
        hook = unwrapped.model.register_forward_hook(lambda _m, _args, out: caught.append(out.aux_loss))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        if not (caught and model.training):
            return result
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        self._metrics["train"]["aux_loss"].append(float(caught[0].detach()))
        aux = coef * caught[0] / steps
        return (result[0] + aux, result[1]) if return_outputs else result + aux


class MetricsFile(TrainerCallback):
    """Every training log row as a line of OUT_DIR/sft_metrics.jsonl. On resume from step k the rows after k (from
    the interrupted attempt) are dropped first, so the file reads like one uninterrupted run."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / METRICS_FILE

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        kept = [row for row in read_metrics(self.path) if row["step"] <= state.global_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def on_log(self, args: Any, state: TrainerState, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics file (sft's or distill's); a last line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(out_dir: Path) -> Path:
    """OUT_DIR/sft_loss.png: training loss (and token accuracy) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir / METRICS_FILE)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("loss", "mean_token_accuracy")):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, markersize=3)
        ax.set_title(f"SFT {key.replace('_', ' ')}")
        ax.set_xlabel("step")
    fig.tight_layout()
    out = out_dir / LOSS_PNG
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def sft_config(recipe: SFTRecipe, out_dir: Path) -> SFTConfig:
    """TRL arguments of the recipe: packed padding-free rows, completion-only loss, one packed row per forward."""
    t, r = recipe.train, recipe.run
    return SFTConfig(
        output_dir=str(out_dir), max_steps=t.steps or -1, num_train_epochs=t.epochs, learning_rate=t.lr,
        lr_scheduler_type=t.lr_schedule, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], max_grad_norm=t.max_grad_norm, seed=t.seed,
        per_device_train_batch_size=1, gradient_accumulation_steps=t.batch_tokens // t.token_budget,
        max_length=t.token_budget, packing=True, packing_strategy="bfd", padding_free=True,
        completion_only_loss=True, bf16=recipe.model.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=recipe.model.gradient_checkpointing, dataset_num_proc=recipe.data.num_proc,
        logging_steps=r.logging_steps, save_strategy="steps" if r.save_steps else "no", save_steps=r.save_steps or 1,
        save_total_limit=r.keep_checkpoints, report_to=list(r.report_to),
        disable_tqdm=not r.progress)


def build_trainer(recipe: SFTRecipe, model_path: str, out_dir: Path) -> SSEHSFTTrainer:
    """The trainer over the recipe's data, with the fp32 master weights of `model_path` (bf16 runs autocast)."""
    import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes; Transformer teachers load too)
    from sse_rl.models.hf_attention import use_varlen_attention

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    use_varlen_attention(model, half_precision=recipe.model.dtype == "bfloat16")
    dataset = datasets.Dataset.from_list(build_examples(recipe.data, tokenizer))
    return SSEHSFTTrainer(model=model, args=sft_config(recipe, out_dir), train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[MetricsFile(out_dir)])


def run_sft(recipe: SFTRecipe, model_path: str, out_dir: Path) -> Path:
    """Train (resuming from OUT_DIR's last checkpoint, if any), save OUT_DIR/final and the loss plot."""
    trainer = build_trainer(recipe, model_path, out_dir)
    last = get_last_checkpoint(str(out_dir))
    if last:
        logger.info("resuming from %s", last)
    trainer.train(resume_from_checkpoint=last)
    final = out_dir / FINAL_DIR
    trainer.save_model(str(final))
    png = plot_loss(out_dir)
    logger.info("done: %s, %s, %s", final, out_dir / METRICS_FILE, png)
    return final


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_parser("sse-rl sft", __doc__.split("\n\n")[0], SFTRecipe, "recipes/arith_sft.yaml")
    return parser.parse_intermixed_args(argv)  # flags may come after the overrides


def main(argv: list[str] | None = None) -> int:
    from sse_rl.train import build_policy

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = validate(*parse_recipe(args.recipe, args.overrides, SFTRecipe))
    if args.dry_run:
        print(dry_run.report(recipe))
        return 0
    out_dir = Path(recipe.out_dir)
    write_recipe(recipe, out_dir)
    run_sft(recipe, build_policy(recipe, out_dir), out_dir)
    return 0


if __name__ == "__main__":  # through the CLI, so that a refused recipe is its message and exit 2
    from sse_rl.cli import main as cli_main

    raise SystemExit(cli_main(["sft", *sys.argv[1:]]))
