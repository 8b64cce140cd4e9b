"""`sse-rl distill RECIPE.yaml [key=value ...]`: distil a dense Transformer teacher into an SSE-H student.

The route of Mamba-in-the-Llama and LoLCATs after `hybridize`: the student's SSE layers first learn to stand in for
the attention layers they replaced, then the whole student learns the teacher's next-token distributions.

Stages (`stages`, run in order; each trains into OUT_DIR/<stage>/ and starts from the previous stage's final):
- `align`: layer-wise. One teacher forward per batch (no gradients); forward hooks on the teacher's `self_attn` of
  every layer the student holds as SSE catch that attention's input (the normed hidden states) and output; the
  student's SSE mixer of the same layer runs on that input (packed sequence bounds from the position ids) and the
  loss is the mean over SSE layers of MSE(student out, teacher out) in fp32, plus the router balance loss. Only the
  SSE mixers' parameters train; the student's full forward never runs.
- `logits`: end to end. The teacher runs online under no_grad on the same packed batch, the student runs with
  gradients, and the loss is a divergence between their next-token distributions over every token whose label is
  not -100 (shifted like the LM loss; the prompt is masked unless `data.text_column` rows are used), plus the router
  balance loss. `logits.loss`: forward_kl = KL(teacher || student) [default], reverse_kl = KL(student || teacher),
  jsd = generalised JSD with mixture (1 - beta) * student + beta * teacher (GKD's definition); both distributions
  at `logits.temperature`. `logits.top_k`: 0 = over the full vocabulary; k > 0 = over the teacher's k most likely
  tokens only, both distributions renormalised over those k (the student's logits gathered at the teacher's ids),
  which is cheaper and ignores the teacher's tail. `logits.train`: all parameters, or only the SSE mixers'.
  `distill/kl` is this divergence per token (the configured one, so a JSD under loss=jsd).

Reused from TRL (1.16) and transformers, and why:
- `SFTTrainer` (subclassed, as `sse-rl sft` does): dataset preparation, best-fit-decreasing packing into
  padding-free rows with position ids restarting at 0 (SSE-H and transformers' masks both derive the sequence bounds
  from them), completion-only labels, gradient accumulation, checkpoints with optimizer/scheduler/RNG state, resume,
  evaluation and metric averaging (`_metrics`). Only `compute_loss` and `log` are ours.
- The full-vocabulary divergence is `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`, the kernel of TRL's
  `DistillationTrainer`: it folds both models' LM-head projections tile by tile, so neither [tokens, vocab] logits
  tensor exists (a 2B student at 16k tokens and a 152k vocabulary would need ~10 GB for each).
- The top-k divergence is `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd; static, forward/reverse/JSD with
  temperature) on the [tokens, k] logits.
- `_ForwardRedirection` (TRL's, used the same way by DistillationTrainer) routes our loss through the wrapped
  model's forward, so DDP/FSDP hooks fire although the loss calls the backbone and the mixers directly.
- Not reused: `DistillationTrainer` and `GKDTrainer` themselves. Both train on prompts padded into a batch and on
  on-policy generations from the student (HF `generate` or vLLM); neither packs padding-free rows, neither knows the
  layer-wise stage or the SSE router loss. The student here learns on the teacher's data (lmbda = 0 in GKD terms).

Choices:
1) Config is data: `sse_rl.config.DistillRecipe`, checked by `config.validate` with the teacher and the student
   (teacher/student tokenizers identical, shapes equal, the teacher a dense Transformer; all errors at once, by
   key), then the data rows are rendered (every row has its columns), all before anything is written to OUT_DIR.
2) `student.path: ""` hybridizes the teacher into OUT_DIR/student (`sse_rl.models.hybridize`).
3) Resume: a stage with OUT_DIR/<stage>/final is skipped; otherwise it resumes from its last complete checkpoint
   (one with trainer_state.json, written last; a checkpoint cut short by a kill is removed). OUT_DIR/final is the
   last stage's final, an SSE-H checkpoint for `sse-rl sft`, `sse-rl train` and `sse-rl eval`.
4) OUT_DIR/distill_metrics.jsonl: a row {"stage", "step", ...} per logging step (distill/loss, distill/kl or
   distill/mse and per layer distill/mse_layer<i>, distill/aux_loss) and per held-out evaluation
   (distill/eval_kl or distill/eval_mse, ...) at each stage's start, every `run.eval_steps` and at its end;
   rows after a resumed step are dropped first. OUT_DIR/distill_curves.png plots them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainerState
from trl import SFTConfig, SFTTrainer

import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)
from sse_rl import dry_run
from sse_rl.config.describe import recipe_parser
from sse_rl.config import (
    DistillRecipe,
    LogitsStageConfig,
    RecipeError,
    StageConfig,
    parse_recipe,
    validate,
    write_recipe,
)
from sse_rl.sft import read_metrics

logger = logging.getLogger("sse_rl.distill")
METRICS_FILE, CURVES_PNG, FINAL_DIR, STUDENT_DIR = "distill_metrics.jsonl", "distill_curves.png", "final", "student"
TOPK_CHUNK = 1024  # tokens per top-k divergence chunk (recomputed in backward, so one chunk's gathers are alive)


# ---------------------------------------------------------------------------------------------------------------
# Divergences


def full_vocab_divergence(h_s: Tensor, h_t: Tensor, head_s: nn.Linear, head_t: nn.Linear, beta: float,
                          temperature: float) -> Tensor:
    """Per-token divergence [n] over the whole vocabulary from final hidden states [n, D] and LM heads, never
    building either [n, V] logits (TRL's chunked kernel; beta 0 = forward KL, 1 = reverse KL)."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    divergence, _entropy = ChunkedDivergenceFunction.apply(
        h_s, head_s.weight, head_s.bias, h_t.detach(), head_t.weight.detach(),
        None if head_t.bias is None else head_t.bias.detach(), beta, temperature, 1.0, None, 1.0, None)
    return divergence


def _gkd_loss() -> Any:
    """`GKDTrainer.generalized_jsd_loss`, imported without TRL's experimental-API notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _topk_chunk(h_s: Tensor, h_t: Tensor, w_s: Tensor, w_t: Tensor, k: int, beta: float,
                temperature: float) -> Tensor:
    with torch.no_grad():
        top, ids = F.linear(h_t, w_t).float().topk(k, dim=-1)  # [n, k]
    student = torch.einsum("nd,nkd->nk", h_s, w_s[ids]).float()  # the student's logits at the teacher's top ids
    return _gkd_loss()(student, top, beta=beta, temperature=temperature, reduction="none").sum(-1)


def topk_divergence(h_s: Tensor, h_t: Tensor, head_s: nn.Linear, head_t: nn.Linear, k: int, beta: float,
                    temperature: float) -> Tensor:
    """Per-token divergence [n] over the teacher's top-k tokens, both distributions renormalised over those k.
    Chunks of TOPK_CHUNK tokens are recomputed in backward, so the gathered head rows of one chunk are alive."""
    from torch.utils.checkpoint import checkpoint

    if head_s.bias is not None or head_t.bias is not None:
        raise ValueError("logits.top_k: LM heads with a bias are not supported; use logits.top_k=0")
    w_t = head_t.weight.detach().to(h_t.dtype)
    parts = [checkpoint(_topk_chunk, h_s[i:i + TOPK_CHUNK], h_t[i:i + TOPK_CHUNK].detach(), head_s.weight, w_t, k,
                        beta, temperature, use_reentrant=False) for i in range(0, h_s.shape[0], TOPK_CHUNK)]
    return torch.cat(parts) if parts else h_s.new_zeros(0)


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def sse_layer_indices(student: nn.Module) -> list[int]:
    return [i for i, kind in enumerate(student.config.layer_types) if kind == "linear_attention"]


def set_trainable(student: nn.Module, stage: str, train: str) -> None:
    """Align trains only the SSE mixers; logits trains everything or (train: sse) only the SSE mixers."""
    only_sse = stage == "align" or train == "sse"
    prefixes = tuple(f"model.layers.{i}.attn." for i in sse_layer_indices(student))
    for name, param in student.named_parameters():
        param.requires_grad_(not only_sse or name.startswith(prefixes))


# The sequence bounds of a packed row that TRL's padding-free collator adds to a batch, read by flash attention.
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def teacher_hidden(teacher: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """The teacher backbone's final hidden states [1, L, D] of a packed row. Without a cache transformers reads
    packed sequences from position ids restarting at 0 (masking_utils.find_packed_sequence_indices), so no token
    attends across a sequence bound; with one (use_cache defaults to True outside training) it would. The
    collator's sequence bounds go along for varlen attention (`hf_attention`), which SDPA ignores."""
    packed = {key: inputs[key] for key in PACKED_KWARGS if key in inputs}
    return teacher.base_model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
                              **packed).last_hidden_state


def teacher_layers(teacher: nn.Module) -> nn.ModuleList:
    """The teacher's decoder layers (Llama/Qwen/Mistral-style `model.layers[i].self_attn`)."""
    layers = getattr(teacher.base_model, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"teacher.path: {type(teacher).__name__} has no decoder layers with `self_attn` "
                         "(base_model.layers[i].self_attn) for the align stage to read")
    return layers


class DistillTrainer(SFTTrainer):
    """TRL's SFTTrainer with a distillation loss: `align` (layer-wise MSE of the SSE mixers against the attention
    they replaced) or `logits` (divergence of next-token distributions), each plus SSE-H's router balance loss.

    The loss is scaled for gradient accumulation here (`loss_is_scaled_for_ga`): the logits divergence is summed
    over tokens and divided by the optimizer step's target tokens (`num_items_in_batch`), as TRL does for the LM
    loss; the align MSE and the aux loss are per-micro-batch means divided over the accumulation steps.
    """

    def __init__(self, *args: Any, teacher: nn.Module, stage: str, options: StageConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from trl.models.utils import _ForwardRedirection

        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.stage, self.options = stage, options
        self.sse_layers = sse_layer_indices(self.model)
        self.loss_is_scaled_for_ga = True
        self._redirect = _ForwardRedirection()
        if stage == "align":
            teacher_layers(self.teacher)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # The losses call the student's layers, not the forward that accelerate wraps in autocast, so the stage enters
        # the trainer's autocast here: without it a bf16 recipe trains in fp32 and packed attention falls back from
        # flash varlen to SDPA with a dense [H, T, T] mask.
        student = self.accelerator.unwrap_model(model)
        fn = self._align_loss if self.stage == "align" else self._logits_loss
        with self.accelerator.autocast():
            loss, metrics = self._redirect(model, student, fn, student, inputs, num_items_in_batch)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        return (loss, None) if return_outputs else loss

    def _accumulation(self) -> int:
        """Micro-batches per optimizer step (1 in evaluation)."""
        return self.current_gradient_accumulation_steps if self.model.training else 1

    def _with_aux(self, student: nn.Module, loss: Tensor, aux: Tensor, metrics: dict[str, float],
                  steps: int) -> Tensor:
        """`loss` plus the router balance loss (weighted by the student's aux_loss_coef, spread over the
        accumulation steps); distill/loss logs the unscaled sum."""
        coef = student.config.aux_loss_coef
        metrics["distill/aux_loss"] = float(aux.detach())
        main_metric = metrics["distill/mse" if self.stage == "align" else "distill/kl"]
        metrics["distill/loss"] = main_metric + coef * metrics["distill/aux_loss"]
        return loss + coef * aux / steps

    def _logits_loss(self, student: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                     ) -> tuple[Tensor, dict[str, float]]:
        o: LogitsStageConfig = self.options
        ids, pos = inputs["input_ids"], inputs["position_ids"]
        with torch.no_grad():
            h_t = teacher_hidden(self.teacher, inputs)
        out = student.base_model(input_ids=ids, position_ids=pos, use_cache=False)
        mask = inputs["labels"][:, 1:] != -100  # position t predicts token t + 1
        h_s, h_t = out.last_hidden_state[:, :-1][mask], h_t[:, :-1][mask].to(out.last_hidden_state.dtype)
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": o.beta}[o.loss]
        head_s, head_t = student.get_output_embeddings(), self.teacher.get_output_embeddings()
        per_token = (topk_divergence(h_s, h_t, head_s, head_t, o.top_k, beta, o.temperature) if o.top_k else
                     full_vocab_divergence(h_s, h_t, head_s, head_t, beta, o.temperature))
        total, count = per_token.sum(), mask.sum()
        metrics = {"distill/kl": float(total.detach() / count.clamp(min=1))}
        steps = self._accumulation()
        if self.model.training and num_items_in_batch is not None:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = total / count.clamp(min=1) / steps
        return self._with_aux(student, loss, out.aux_loss, metrics, steps), metrics

    def _align_loss(self, student: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                    ) -> tuple[Tensor, dict[str, float]]:
        from sse_rl.models.modeling import cu_seqlens_from_position_ids

        ids, pos = inputs["input_ids"], inputs["position_ids"]
        caught = self._teacher_attention(inputs)
        cu_seqlens = cu_seqlens_from_position_ids(pos)
        errors, aux = [], torch.zeros((), device=ids.device)
        for i in self.sse_layers:
            mixer = student.base_model.layers[i].attn
            x, target = caught[i]
            out, layer_aux = mixer(x.to(mixer.o_proj.weight.dtype), None, cu_seqlens, None)
            errors.append(F.mse_loss(out.float(), target.float()))
            aux = aux + layer_aux
        mse = torch.stack(errors).mean()
        metrics = {"distill/mse": float(mse.detach())}
        metrics.update({f"distill/mse_layer{i}": float(e.detach()) for i, e in zip(self.sse_layers, errors)})
        steps = self._accumulation()
        return self._with_aux(student, mse / steps, aux, metrics, steps), metrics

    def _teacher_attention(self, inputs: dict[str, Any]) -> dict[int, tuple[Tensor, Tensor]]:
        """Input (normed hidden states) and output of the teacher's attention at every SSE layer of the student,
        from one teacher forward without gradients."""
        caught: dict[int, tuple[Tensor, Tensor]] = {}

        def hook(i: int) -> Any:
            def catch(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                caught[i] = (x, output[0] if isinstance(output, tuple) else output)
            return catch

        layers = teacher_layers(self.teacher)
        handles = [layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in self.sse_layers]
        try:
            with torch.no_grad():
                teacher_hidden(self.teacher, inputs)
        finally:
            for handle in handles:
                handle.remove()
        return caught

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Held-out metrics as distill/eval_* (TRL would prefix them eval_distill/*)."""
        if not self.model.training:
            for key, values in self._metrics["eval"].items():
                logs[key.replace("distill/", "distill/eval_", 1)] = sum(values) / len(values)
            self._metrics["eval"].clear()
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------------------------
# Metrics file and plot


class MetricsFile(TrainerCallback):
    """Every distill log row of one stage as a line of OUT_DIR/distill_metrics.jsonl. On resume from step k the
    stage's rows after k (from the interrupted attempt) are dropped first, and on a fresh start all of the stage's
    rows (an attempt killed before its first checkpoint), so the file reads like one run."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage

    def on_train_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        kept = [row for row in read_metrics(self.path)
                if row["stage"] != self.stage or (state.global_step > 0 and row["step"] <= state.global_step)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.path)

    def on_log(self, args: Any, state: TrainerState, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        if logs and any(key.startswith("distill/") for key in logs):
            with self.path.open("a") as f:
                f.write(json.dumps({"stage": self.stage, "step": state.global_step, **logs}) + "\n")


def plot_curves(out_dir: Path, stages: list[str]) -> Path:
    """OUT_DIR/distill_curves.png: per stage, the training metric and the held-out one against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out_dir / METRICS_FILE)
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.2), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        metric = "mse" if stage == "align" else "kl"
        for key, label in ((f"distill/{metric}", "train"), (f"distill/eval_{metric}", "held-out")):
            points = [(r["step"], r[key]) for r in rows if r["stage"] == stage and key in r]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, markersize=3, label=label)
        ax.set_title(f"{stage}: {metric}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    out = out_dir / CURVES_PNG
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Data, stages, entry point


def build_datasets(recipe: DistillRecipe, tokenizer_path: str) -> tuple[list[dict], list[dict]]:
    """TRL examples of the training and held-out rows (rendered with the student's tokenizer, which is the
    teacher's); a row missing a column fails naming its key."""
    from sse_rl.data import read_rows
    from sse_rl.sft import build_examples, rows_to_examples

    d = recipe.data
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    try:
        train = build_examples(d, tokenizer)
        held_out = []
        if d.eval:
            rows = read_rows(d.eval, d.eval_split, d.subset)[:d.eval_rows or None]
            if not rows:
                raise ValueError(f"data.eval: {d.eval} (split {d.eval_split!r}) has no rows")
            held_out = rows_to_examples(rows, d, tokenizer, d.eval, key="data.eval")
    except (ValueError, FileNotFoundError) as err:
        raise RecipeError([str(err)]) from None
    return train, held_out


def stage_config(recipe: DistillRecipe, stage: str, stage_dir: Path, first_attempt: bool, has_eval: bool,
                 ) -> SFTConfig:
    """TRL arguments of one stage: packed padding-free rows, completion-only labels, one packed row per forward."""
    s: StageConfig = getattr(recipe, stage)
    t, r = recipe.train, recipe.run
    return SFTConfig(
        output_dir=str(stage_dir), max_steps=s.steps, learning_rate=s.lr, lr_scheduler_type=s.lr_schedule,
        warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, adam_beta1=t.adam_betas[0],
        adam_beta2=t.adam_betas[1], max_grad_norm=t.max_grad_norm, seed=t.seed, per_device_train_batch_size=1,
        per_device_eval_batch_size=1, gradient_accumulation_steps=t.batch_tokens // t.token_budget,
        max_length=t.token_budget, packing=True, packing_strategy="bfd", padding_free=True,
        completion_only_loss=True, bf16=recipe.student.dtype == "bfloat16", fp16=False,
        gradient_checkpointing=stage == "logits" and recipe.student.gradient_checkpointing,
        dataset_num_proc=recipe.data.num_proc, logging_steps=r.logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=r.eval_steps or s.steps,
        eval_on_start=has_eval and first_attempt, prediction_loss_only=True,
        save_strategy="steps" if r.save_steps else "no", save_steps=r.save_steps or 1,
        save_total_limit=r.keep_checkpoints, report_to=list(r.report_to),
        disable_tqdm=not r.progress)


def last_complete_checkpoint(stage_dir: Path) -> str | None:
    """The newest checkpoint-N holding trainer_state.json (transformers writes it last); newer ones that lack it
    were cut short and are removed, so the stage resumes where its last whole checkpoint left it."""
    found = sorted((int(p.name.split("-")[1]), p) for p in stage_dir.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return str(path)
        logger.warning("removing %s: cut short before its trainer state was written", path)
        shutil.rmtree(path)
    return None


def run_stage(recipe: DistillRecipe, stage: str, init: str, teacher: nn.Module, data: tuple[list, list],
              out_dir: Path) -> Path:
    """Train one stage from `init` into OUT_DIR/<stage> (resuming), save OUT_DIR/<stage>/final; skip a stage
    whose final exists."""
    import datasets

    stage_dir = out_dir / stage
    final = stage_dir / FINAL_DIR
    if final.is_dir():
        logger.info("stage %s: %s exists, skipped", stage, final)
        return final
    stage_dir.mkdir(parents=True, exist_ok=True)
    last = last_complete_checkpoint(stage_dir)
    train, held_out = data
    tokenizer = AutoTokenizer.from_pretrained(init)
    student = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    set_trainable(student, stage, recipe.logits.train)
    trainer = DistillTrainer(
        model=student, args=stage_config(recipe, stage, stage_dir, last is None, bool(held_out)),
        train_dataset=datasets.Dataset.from_list(train),
        eval_dataset=datasets.Dataset.from_list(held_out) if held_out else None, processing_class=tokenizer,
        callbacks=[MetricsFile(out_dir / METRICS_FILE, stage)], teacher=teacher, stage=stage,
        options=getattr(recipe, stage))
    logger.info("stage %s: from %s%s", stage, init, f", resuming from {last}" if last else "")
    trainer.train(resume_from_checkpoint=last)
    bad = [name for name, p in trainer.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # a diverged stage must not hand its weights on as a result
        raise RuntimeError(f"stage {stage}: {len(bad)} student tensors are not finite after training (first: "
                           f"{bad[0]}); {stage}.lr or the data diverged it; {final} is not written, the last "
                           f"checkpoint in {stage_dir} is kept")
    tmp = final.with_name(FINAL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    os.rename(tmp, final)
    return final


def build_student(recipe: DistillRecipe, out_dir: Path) -> str:
    """The student checkpoint: student.path, or the teacher hybridized into OUT_DIR/student (once)."""
    if recipe.student.path:
        return recipe.student.path
    from sse_rl.models.hybridize import hybridize

    path = out_dir / STUDENT_DIR
    if not path.is_dir():
        hybridize(recipe.teacher.path, path, recipe.student.attn_layers or None, seed=recipe.student.seed)
    return str(path)


def load_teacher(recipe: DistillRecipe) -> nn.Module:
    """The teacher without gradients; on a GPU in half precision its packed rows go through flash varlen attention
    (`hf_attention`), as the student's do."""
    from sse_rl.models.hf_attention import use_varlen_attention

    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher.path, dtype=getattr(torch, recipe.teacher.dtype))
    half = "bfloat16" in (recipe.student.dtype, recipe.teacher.dtype)
    use_varlen_attention(teacher, half_precision=half)
    return teacher.eval().requires_grad_(False)


def run_distill(recipe: DistillRecipe, out_dir: Path, data: tuple[list, list]) -> Path:
    """Every stage in order, then OUT_DIR/final (the last stage's final) and the curves."""
    current = build_student(recipe, out_dir)
    teacher = load_teacher(recipe)
    for stage in recipe.stages:
        current = str(run_stage(recipe, stage, current, teacher, data, out_dir))
    final = out_dir / FINAL_DIR
    if not final.is_dir():
        tmp = final.with_name(FINAL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(current, tmp)
        os.rename(tmp, final)
    png = plot_curves(out_dir, recipe.stages)
    logger.info("done: %s, %s, %s", final, out_dir / METRICS_FILE, png)
    return final


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_parser("sse-rl distill", __doc__.split("\n\n")[0], DistillRecipe, "recipes/tiny_distill_cpu.yaml")
    return parser.parse_intermixed_args(argv)  # flags may come after the overrides


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = validate(*parse_recipe(args.recipe, args.overrides, DistillRecipe))
    if args.dry_run:
        print(dry_run.report(recipe))
        return 0
    data = build_datasets(recipe, recipe.student.path or recipe.teacher.path)
    out_dir = Path(recipe.out_dir)
    write_recipe(recipe, out_dir)
    run_distill(recipe, out_dir, data)
    return 0


if __name__ == "__main__":  # through the CLI, so that a refused recipe is its message and exit 2
    from sse_rl.cli import main as cli_main

    raise SystemExit(cli_main(["distill", *sys.argv[1:]]))
