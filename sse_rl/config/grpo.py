"""The GRPO recipe (`sse-rl train`): its schema, the constraints between its fields, and the weight-sync transport its
placement implies.

Defaults live here and only here; code reads fields, never `cfg.get(key, default)`. `model` (`ModelConfig`) is shared
with the SFT recipe, and so are the rules every training recipe obeys (`required_rules`, `adam_betas_rule`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sse_rl.config.reading import TrackerName, bounded
from sse_rl.data import template_fields


@dataclass
class InitConfig:
    """How to build a random policy when `model.path` does not exist yet (tiny recipes build their own)."""

    preset: str = "sse-h-tiny"  # SSE-H or Transformer-teacher preset (init_model.preset_names())
    tokenizer: str = ""  # "pkg.mod:fn" called as fn(out_dir) -> tokenizer dir; or a tokenizer dir / hub id
    seed: int = 0  # seed of the random weights
    overrides: dict[str, Any] = field(default_factory=dict)  # SSEHConfig fields, e.g. {num_hidden_layers: 2}


@dataclass
class ModelConfig:
    path: str = ""  # HF checkpoint dir or hub id; "" = build from `init` into OUT_DIR/base_model
    init: InitConfig | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"  # trainer compute dtype (master weights stay fp32)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, more compute)
    # With gradient_checkpointing: recompute every k-th decoder block only (blocks 0, k, 2k, ...; 1 = all, as in
    # torchtune's selective `ac_option`). The other blocks keep their activations: less recomputation, more memory.
    checkpoint_every: int = bounded(1, ge=1)
    # LM head and final norm in fp32 in the engines and the trainer (issue #28): logits without bf16 rounding on
    # either side, at the cost of an fp32 copy of the LM head in each engine and fp32 head matmuls in both
    lm_head_fp32: bool = False


@dataclass
class DataConfig:
    train: str = ""  # HF hub id ("org/name") or a local .jsonl / .parquet file
    train_split: str = "train"  # split of a hub dataset `train` reads
    eval: str = ""  # held-out prompts (same forms as `train`); "" = no eval
    eval_split: str = "test"  # split of a hub dataset `eval` reads
    subset: str = ""  # HF dataset config name, if the hub dataset has several
    # str.format over the row's columns (dotted paths into nested ones: {extra_info.question}); a template that is
    # one field holding chat messages ({prompt}: TRL's conversational / verl's prompt) is the prompt as written,
    # always through the tokenizer's chat template
    prompt_template: str = "{problem}"
    answer_column: str = "answer"  # column or dotted path (reward_model.ground_truth); reaches rewards as `answer`
    chat_template: bool = False  # wrap a text prompt as a user message with the tokenizer's chat template
    system_prompt: str = ""  # the system turn before every chat prompt (chat_template on, or chat-message prompts)
    drop_incomplete: bool = False  # skip (and count) rows missing a field instead of failing on the first


@dataclass
class RolloutConfig:
    num_engines: int = bounded(1, ge=1)  # vLLM engines sampling in parallel (data parallel)
    group_size: int = bounded(8, ge=2)  # G completions per prompt
    max_tokens: int = bounded(1024, ge=1)  # max response length
    temperature: float = bounded(1.0, gt=0)  # sampling temperature of the rollouts
    top_p: float = bounded(1.0, gt=0, le=1)  # nucleus sampling of the rollouts; 1 = off
    max_model_len: int = bounded(2048, ge=2)  # prompt + response tokens an engine holds per sequence
    dtype: Literal["float32", "bfloat16"] = "float32"  # engine weights and compute dtype
    gpu_memory_utilization: float = bounded(0.5, gt=0, le=1)  # an engine's share of its GPU's memory (vLLM)
    cpu_kvcache_space_gib: int = bounded(1, ge=1)  # VLLM_CPU_KVCACHE_SPACE on CPU engines
    tensor_parallel_size: int = bounded(1, ge=1)  # GPUs each engine shards its weights over
    enforce_eager: bool = True  # false = vLLM captures CUDA graphs (faster decode, slower start)
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
    # The engines record every SSE layer's top-K partitions per token (1 byte per token, SSE layer and k) and return
    # them with the rollouts: the trainer logs the route-flip rate, and algo.routing_replay can replay them.
    record_routes: bool = False
    # The dtype the engines store SSE states in (vLLM's mamba_ssm_cache_dtype, issue #27): auto = float32, the state
    # the trainer carries; bfloat16 halves the state bytes a decode step moves (the kernels still compute in fp32)
    # and widens the rollout/trainer logprob mismatch (bench/mismatch.py --state-dtype bfloat16 measures it)
    state_dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class RewardFunctionConfig:
    spec: str = ""  # built-in name, "pkg.mod:fn" or "path/to/file.py:fn" (rewards.load_reward)
    weight: float = 1.0  # the function's weight in the summed reward
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound with functools.partial


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    accuracy: int = bounded(0, ge=0)  # index of the function whose raw value is "accuracy" (filters, eval)
    num_workers: int = bounded(2, ge=1)  # sandboxed grading processes
    # hard wall clock per reward call: on a grading worker's share of the batch, then, if that call fails, on each of
    # its samples alone (a sample that times out alone scores 0, counted as reward/timeouts); the probe's limit too
    timeout_s: float = bounded(10.0, gt=0)
    max_timeouts: int = bounded(8, ge=1)  # per reward per round: past this many samples timed out alone, its other
                                          # retries are skipped (score 0, counted as reward/skipped)
    # a reward function's NaN or inf: "error" stops the run naming the function and the sample; "zero" scores it 0
    # and counts it as reward/non_finite
    non_finite: Literal["error", "zero"] = "error"


@dataclass
class AlgoConfig:
    # advantage = (r - group mean) / std of the group, the batch, or 1 (Dr. GRPO)
    adv_std_scaling: Literal["group", "batch", "none"] = "group"
    # dapo = mean over all tokens; grpo = per-sequence mean; dr_grpo = sum / max_tokens
    loss_agg: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    clip_eps_low: float = bounded(0.2, ge=0, le=1)  # PPO ratio clip below 1 (1 - eps)
    clip_eps_high: float = bounded(0.28, ge=0)  # PPO ratio clip above 1 (1 + eps; DAPO clip-higher)
    kl_coef: float = bounded(0.0, ge=0)  # k3 KL to the initial policy; > 0 loads a reference model
    # weight the KL term by pi / pi_old per token, removing the bias of estimating KL(pi || ref) from pi_old's
    # samples (TRL's use_bias_correction_kl); off by default, as in TRL
    kl_bias_correction: bool = False
    ppo_epochs: int = bounded(1, ge=1)  # passes over each rollout batch
    mini_batches: int = bounded(1, ge=1)  # optimizer steps per pass
    # rollout/trainer mismatch correction: truncated importance ratio per token or per sequence
    is_correction: Literal["token_truncate", "sequence_truncate", "none"] = "token_truncate"
    is_cap: float = bounded(2.0, gt=0)  # truncation C of the rollout/trainer importance ratio
    dynamic_sampling: bool = True  # drop groups whose accuracy has zero variance, refill the batch
    max_sampling_rounds: int = bounded(3, ge=1)  # dynamic sampling: rounds per step before training on what is kept
    overlong_filter: bool = False  # truncated completions (finish "length") get no loss
    # weight of the SSE router balance loss added to the policy loss; None = the policy config's aux_loss_coef
    # (the SFT/pre-training weight). Adam turns even a tiny but consistent gradient into lr-sized steps, so RL runs
    # on a balanced router may want it lower or 0 (MoE RL recipes commonly lower or drop theirs).
    aux_loss_coef: float | None = bounded(None, ge=0)
    # The trainer's SSE layers use the partitions the engine chose (rollout.record_routes) instead of their own
    # top-K, with the trainer's router probabilities at them as weights, so the router keeps learning (issue #28)
    routing_replay: bool = False


@dataclass
class TrainConfig:
    steps: int = bounded(100, ge=1)  # GRPO steps (rollout, reward, update, sync)
    prompts_per_step: int = bounded(32, ge=1)  # prompts per step, each sampled group_size times
    lr: float = bounded(1e-6, gt=0)  # AdamW peak learning rate
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    warmup_steps: int = bounded(0, ge=0)  # linear warm-up steps
    weight_decay: float = bounded(0.0, ge=0)  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    max_grad_norm: float = bounded(1.0, gt=0)  # gradient clipping by global norm
    token_budget: int = bounded(8192, ge=1)  # max tokens per packed micro-batch
    num_trainers: int = bounded(1, ge=1)  # torch.distributed ranks (gloo on CPU, nccl on GPU)
    num_gpus_per_trainer: float = bounded(0.0, ge=0)  # GPUs per trainer rank; 0 = CPU trainer
    threads_per_trainer: int = bounded(1, ge=1)  # torch intra-op threads of a CPU trainer
    # how ranks hold the policy: fsdp2 = fully_shard per SSEHBlock + backbone + lm_head (params, grads and Adam
    # state sharded; bf16 compute / fp32 reduce when model.dtype=bfloat16); ddp = full copy per rank, gradients
    # all-reduced (autocast for bfloat16). Both run on gloo (CPU) and nccl (GPU).
    strategy: Literal["ddp", "fsdp2"] = "fsdp2"
    # torch.compile each decoder block and the logprob/entropy head (dynamic shapes; the SSE Triton op stays outside
    # the graphs): fuses the elementwise work around the matmuls. Compiled when the trainer starts (minutes at 2B).
    compile: bool = False
    # keep the AdamW state (2x the fp32 weights: 16.9 GiB at 2B) in host memory between train phases, so an engine
    # sharing the GPU rolls out in that memory: a copy each way per step (back at the phase's start, overlapping the
    # first micro-batches), pinned host buffers of the state's size
    offload_optimizer: bool = False
    # steps in a row whose update a non-finite loss or gradient skipped, before the run stops (sse_rl.grpo.guard)
    max_skipped_steps: int = bounded(3, ge=1)
    # steps in a row that train nothing (no kept group whose rewards vary) before the run stops
    max_empty_steps: int = bounded(5, ge=1)


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
    benchmark_top_p: float = bounded(0.95, gt=0, le=1)  # nucleus sampling of the benchmark


@dataclass
class RunConfig:
    save_every: int = bounded(10, ge=0)  # 0 = only at the end
    keep_checkpoints: int = bounded(2, ge=1)  # newest checkpoints kept; older ones are deleted
    probe_prompts: int = bounded(4, ge=1)  # prompts whose first-token logprobs check each weight sync
    probe_tolerance: float = bounded(1e-3, gt=0)  # max |engine - trainer| first-token logprob after a sync
    # Trackers that get every step's metrics (sse_rl.trackers): tensorboard, wandb, trackio, mlflow; [] = none
    report_to: list[TrackerName] = field(
        default_factory=lambda: ["tensorboard"])
    log_completions: int = bounded(0, ge=0)  # completions per step to OUT_DIR/completions.jsonl and the trackers
    progress: bool = True  # progress bar on stderr
    ray_num_cpus: int = bounded(4, ge=1)  # logical CPUs of a local Ray (actors reserve 1 each)


@dataclass
class Recipe:
    """A GRPO recipe (`sse-rl train`)."""

    out_dir: str = ""  # the run directory: config.yaml, metrics, checkpoints, final/
    seed: int = 0  # seeds the policy init, data order, rollout sampling and the trainer
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


def required_rules(out_dir: str, train: str, model: ModelConfig) -> list[str]:
    """What GRPO and SFT recipes must name: a run directory, training data and a policy."""
    errors = []
    if not out_dir:
        errors.append("out_dir: required (the run directory), e.g. out_dir=runs/my_run")
    if not train:
        errors.append("data.train: required (HF hub id, a .jsonl/.parquet file or pkg.mod:fn)")
    if not model.path and model.init is None:
        errors.append("model.path: required unless model.init says how to build the policy")
    return errors


def adam_betas_rule(key: str, betas: list[float]) -> list[str]:
    """Adam takes exactly two decay rates, each in [0, 1)."""
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        return [f"{key}: two numbers in [0, 1) expected, got {betas}"]
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


def grpo_rules(recipe: Recipe) -> list[str]:
    """The constraints between a GRPO recipe's fields, which no single field's type or bound expresses."""
    errors = required_rules(recipe.out_dir, recipe.data.train, recipe.model) + _reward_rules(recipe.reward)
    r, t = recipe.rollout, recipe.train
    if recipe.algo.mini_batches > t.prompts_per_step:
        errors.append(f"algo.mini_batches: {recipe.algo.mini_batches} mini-batches cannot split "
                      f"train.prompts_per_step={t.prompts_per_step} groups")
    if r.max_tokens >= r.max_model_len:
        errors.append(f"rollout.max_tokens: {r.max_tokens} leaves no room for the prompt in "
                      f"rollout.max_model_len={r.max_model_len}")
    errors += adam_betas_rule("train.adam_betas", t.adam_betas)
    if recipe.eval.benchmark_max_tokens >= r.max_model_len:
        errors.append(f"eval.benchmark_max_tokens: {recipe.eval.benchmark_max_tokens} leaves no room for the prompt "
                      f"in rollout.max_model_len={r.max_model_len}")
    if recipe.model.checkpoint_every > 1 and not recipe.model.gradient_checkpointing:
        errors.append(f"model.checkpoint_every: {recipe.model.checkpoint_every} picks the blocks gradient "
                      "checkpointing recomputes, but model.gradient_checkpointing is false; turn it on or leave "
                      "checkpoint_every 1")
    errors += _placement_rules(recipe)
    if recipe.algo.routing_replay and not r.record_routes:
        errors.append("algo.routing_replay: replays the routes the engines record; set rollout.record_routes=true")
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
