"""The distillation recipe (`sse-rl distill`): its schema and the constraints between its fields.

A dense Transformer teacher into an SSE-H student, by stage (`STAGES`); the data section extends SFT's with held-out
rows. What the teacher and student checkpoints must be is checked in `checks` (it reads their configs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sse_rl.config.grpo import adam_betas_rule
from sse_rl.config.reading import TrackerName, bounded
from sse_rl.config.sft import SFTDataConfig, batch_tokens_rule, sft_data_rules

STAGES = ("align", "logits")


@dataclass
class TeacherConfig:
    path: str = ""  # HF checkpoint dir or hub id of a dense Transformer (not SSE-H)
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights of the frozen teacher


@dataclass
class StudentConfig:
    path: str = ""  # SSE-H checkpoint dir or hub id; "" = hybridize the teacher into OUT_DIR/student
    attn_layers: list[int] = field(default_factory=list)  # with path "": layers kept as attention; [] = hybridize's
    seed: int = 0  # with path "": seed of the SSE layers' new parameters
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (autocast); master weights stay fp32
    gradient_checkpointing: bool = False  # logits stage: recompute every block in backward


@dataclass
class StageConfig:
    steps: int = bounded(100, ge=1)  # optimizer steps of this stage
    lr: float = bounded(1e-3, gt=0)  # AdamW peak learning rate
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"  # after warm-up
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up steps
    weight_decay: float = bounded(0.0, ge=0)  # AdamW weight decay


@dataclass
class LogitsStageConfig(StageConfig):
    lr: float = bounded(1e-4, gt=0)  # AdamW peak learning rate
    # KL(teacher || student), KL(student || teacher) or generalised JSD (beta)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = bounded(0.5, ge=0, le=1)  # loss=jsd: the teacher's weight in the mixture, in (0, 1)
    temperature: float = bounded(1.0, gt=0)  # both distributions at this temperature
    top_k: int = bounded(0, ge=0)  # 0 = full vocabulary; k = the teacher's top k tokens, renormalised over them
    train: Literal["all", "sse"] = "all"  # parameters that learn: all, or only the SSE mixers'


@dataclass
class DistillDataConfig(SFTDataConfig):
    eval: str = ""  # held-out rows, same forms as `train`; "" = no held-out metric
    eval_split: str = "test"  # split of a hub dataset `eval` reads
    eval_rows: int = bounded(0, ge=0)  # use the first N held-out rows; 0 = all


@dataclass
class DistillTrainConfig:
    token_budget: int = bounded(4096, ge=8)  # tokens per packed micro-batch (longer sequences are truncated)
    batch_tokens: int = bounded(65536, ge=8)  # tokens per optimizer step: a multiple of token_budget
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    max_grad_norm: float = bounded(1.0, gt=0)  # gradient clipping by global norm
    seed: int = 0  # data order seed


@dataclass
class DistillRunConfig:
    logging_steps: int = bounded(10, ge=1)  # metrics every N steps (distill_metrics.jsonl)
    save_steps: int = bounded(200, ge=0)  # checkpoint every N steps (for resume); 0 = only each stage's final
    eval_steps: int = bounded(0, ge=0)  # held-out metric every N steps; 0 = at each stage's start and end only
    keep_checkpoints: int = bounded(2, ge=1)  # newest checkpoints kept; older ones are deleted
    # Trackers TRL reports to (its report_to): tensorboard, wandb, trackio, mlflow; [] = none
    report_to: list[TrackerName] = field(default_factory=list)
    progress: bool = True  # progress bar on stderr


@dataclass
class DistillRecipe:
    """A distillation recipe (`sse-rl distill`): a dense Transformer teacher into an SSE-H student, by stage."""

    out_dir: str = ""  # the run directory: config.yaml, metrics, align/, logits/, final/
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    # stages to run, in order: align (layer MSE), logits (KL)
    stages: list[Literal["align", "logits"]] = field(default_factory=lambda: list(STAGES))
    align: StageConfig = field(default_factory=StageConfig)
    logits: LogitsStageConfig = field(default_factory=LogitsStageConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    run: DistillRunConfig = field(default_factory=DistillRunConfig)


def distill_rules(recipe: DistillRecipe) -> list[str]:
    """The constraints between a distillation recipe's fields."""
    errors = []
    if not recipe.out_dir:
        errors.append("out_dir: required (the run directory), e.g. out_dir=runs/distill")
    if not recipe.teacher.path:
        errors.append("teacher.path: required (HF checkpoint dir or hub id of the Transformer teacher)")
    if not recipe.data.train:
        errors.append("data.train: required (HF hub id, a .jsonl/.parquet file or pkg.mod:fn)")
    if not recipe.stages:
        errors.append(f"stages: at least one of {', '.join(STAGES)}")
    elif len(set(recipe.stages)) != len(recipe.stages):
        errors.append(f"stages: each stage once, got {recipe.stages}")
    if recipe.student.path and recipe.student.attn_layers:
        errors.append("student.attn_layers: only used to hybridize the teacher (student.path empty); the student at "
                      f"student.path={recipe.student.path} has its own")
    if recipe.logits.loss == "jsd" and not 0 < recipe.logits.beta < 1:
        errors.append(f"logits.beta: loss jsd needs 0 < beta < 1, got {recipe.logits.beta} (0 is forward_kl, 1 "
                      "reverse_kl)")
    t = recipe.train
    errors += batch_tokens_rule("train", t.batch_tokens, t.token_budget)
    errors += adam_betas_rule("train.adam_betas", t.adam_betas)
    if recipe.data.eval_rows and not recipe.data.eval:
        errors.append("data.eval_rows: set, but data.eval names no held-out rows")
    return errors + sft_data_rules(recipe.data)
