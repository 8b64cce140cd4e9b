"""The recipe schema: one dataclass per section, loaded from YAML plus dotted `key=value` overrides.

Choices:
1) Defaults live here and only here; code reads fields, never `cfg.get(key, default)`.
2) The whole recipe is checked before anything starts (no Ray actor, no engine), and every error is reported at
   once, each naming its dotted key (`algo.clip_eps_high: must be >= 0, got -1`).
3) Overrides are YAML scalars (`train.lr=3e-4`, `rollout.max_tokens=64`, `reward.functions.0.weight=0.5`).
4) The resolved recipe is written to the run directory as YAML (`to_yaml`), so a run can be repeated from it.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-6` as a string; recipes mean a float (YAML 1.2 reads it as one)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)

R = TypeVar("R")


class RecipeError(ValueError):
    """All problems of a recipe, one per line, each starting with its dotted key."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid recipe:\n  " + "\n  ".join(errors))


def _bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A field with numeric bounds, checked at load time."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le})


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
    checkpoint_every: int = _bounded(1, ge=1)


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
    num_engines: int = _bounded(1, ge=1)
    group_size: int = _bounded(8, ge=2)  # G completions per prompt
    max_tokens: int = _bounded(1024, ge=1)  # max response length
    temperature: float = _bounded(1.0, gt=0)
    top_p: float = _bounded(1.0, gt=0, le=1)
    max_model_len: int = _bounded(2048, ge=2)
    dtype: Literal["float32", "bfloat16"] = "float32"
    gpu_memory_utilization: float = _bounded(0.5, gt=0, le=1)
    cpu_kvcache_space_gib: int = _bounded(1, ge=1)  # VLLM_CPU_KVCACHE_SPACE on CPU engines
    tensor_parallel_size: int = _bounded(1, ge=1)
    enforce_eager: bool = True
    # Concurrent sequences per engine. SSE-H keeps one state slot per running sequence, and vLLM refuses CUDA-graph
    # capture when this exceeds the slots its memory share holds (seen on an H100: 1024 > 656 slots for SSE-H-2B at
    # gpu_memory_utilization 0.4), so it is set here rather than left at vLLM's default.
    max_num_seqs: int = _bounded(256, ge=1)
    num_gpus_per_engine: float = _bounded(0.0, ge=0)  # 0 = CPU engine
    # GPU engines sharing the GPU with the trainer: what the engine frees while the trainer runs (vLLM sleep mode).
    # 0 = nothing; 1 = offload weights to CPU, drop the KV/state cache; 2 = drop both (the next sync rewrites all
    # weights anyway, so 2 costs no copy back).
    sleep_level: int = _bounded(0, ge=0, le=2)
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
    accuracy: int = _bounded(0, ge=0)  # index of the function whose raw value is "accuracy" (filters, eval)
    num_workers: int = _bounded(2, ge=1)
    timeout_s: float = _bounded(10.0, gt=0)  # hard per-sample wall clock; a timeout scores 0


@dataclass
class AlgoConfig:
    adv_std_scaling: Literal["group", "batch", "none"] = "group"
    loss_agg: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    clip_eps_low: float = _bounded(0.2, ge=0, le=1)
    clip_eps_high: float = _bounded(0.28, ge=0)
    kl_coef: float = _bounded(0.0, ge=0)  # k3 KL to the initial policy; > 0 loads a reference model
    ppo_epochs: int = _bounded(1, ge=1)  # passes over each rollout batch
    mini_batches: int = _bounded(1, ge=1)  # optimizer steps per pass
    is_correction: Literal["token_truncate", "sequence_truncate", "none"] = "token_truncate"
    is_cap: float = _bounded(2.0, gt=0)  # truncation C of the rollout/trainer importance ratio
    dynamic_sampling: bool = True  # drop groups whose accuracy has zero variance, refill the batch
    max_sampling_rounds: int = _bounded(3, ge=1)
    overlong_filter: bool = False  # truncated completions (finish "length") get no loss
    # weight of the SSE router balance loss added to the policy loss; None = the policy config's aux_loss_coef
    # (the SFT/pre-training weight). Adam turns even a tiny but consistent gradient into lr-sized steps, so RL runs
    # on a balanced router may want it lower or 0 (MoE RL recipes commonly lower or drop theirs).
    aux_loss_coef: float | None = _bounded(None, ge=0)


@dataclass
class TrainConfig:
    steps: int = _bounded(100, ge=1)
    prompts_per_step: int = _bounded(32, ge=1)
    lr: float = _bounded(1e-6, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = _bounded(0, ge=0)
    weight_decay: float = _bounded(0.0, ge=0)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = _bounded(1.0, gt=0)
    token_budget: int = _bounded(8192, ge=1)  # max tokens per packed micro-batch
    num_trainers: int = _bounded(1, ge=1)  # torch.distributed ranks (gloo on CPU, nccl on GPU)
    num_gpus_per_trainer: float = _bounded(0.0, ge=0)
    threads_per_trainer: int = _bounded(1, ge=1)  # torch intra-op threads of a CPU trainer
    # how ranks hold the policy: fsdp2 = fully_shard per SSEHBlock + backbone + lm_head (params, grads and Adam
    # state sharded; bf16 compute / fp32 reduce when model.dtype=bfloat16); ddp = full copy per rank, gradients
    # all-reduced (autocast for bfloat16). Both run on gloo (CPU) and nccl (GPU).
    strategy: Literal["ddp", "fsdp2"] = "fsdp2"
    # torch.compile each decoder block and the logprob/entropy head (dynamic shapes; the SSE Triton op stays outside
    # the graphs): fuses the elementwise work around the matmuls. Compiled when the trainer starts (minutes at 2B).
    compile: bool = False


@dataclass
class EvalConfig:
    every: int = _bounded(0, ge=0)  # 0 = only before the first and after the last step
    num_prompts: int = _bounded(0, ge=0)  # 0 = the whole eval set
    samples: int = _bounded(1, ge=1)  # completions per prompt
    temperature: float = _bounded(1.0, ge=0)  # 0 = greedy
    # Validation benchmark scored by the eval package (sse_rl.eval): a benchmark it knows (aime24, aime25, math500)
    # or a local .jsonl/.parquet file with `problem` and `answer`; "" = off. Prompts are rendered like training
    # prompts (data.prompt_template, data.chat_template); metrics go to metrics.jsonl as val/*.
    benchmark: str = ""
    benchmark_samples: int = _bounded(4, ge=1)  # samples per problem (avg@n, pass@k, maj@k)
    benchmark_every: int = _bounded(0, ge=0)  # 0 = only before the first and after the last step
    benchmark_max_tokens: int = _bounded(0, ge=0)  # 0 = rollout.max_tokens
    benchmark_temperature: float = _bounded(0.6, ge=0)  # 0 = greedy
    benchmark_top_p: float = _bounded(0.95, gt=0, le=1)


@dataclass
class RunConfig:
    save_every: int = _bounded(10, ge=0)  # 0 = only at the end
    keep_checkpoints: int = _bounded(2, ge=1)
    probe_prompts: int = _bounded(4, ge=1)
    probe_tolerance: float = _bounded(1e-3, gt=0)  # max |engine - trainer| first-token logprob after a sync
    tensorboard: bool = True
    progress: bool = True
    ray_num_cpus: int = _bounded(4, ge=1)  # logical CPUs of a local Ray (actors reserve 1 each)


@dataclass
class Recipe:
    out_dir: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


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


def required_fields(out_dir: str, train: str, model: ModelConfig) -> list[str]:
    """What every recipe (GRPO or SFT) must name: a run directory, training data and a policy."""
    errors = []
    if not out_dir:
        errors.append("out_dir: required (the run directory), e.g. out_dir=runs/my_run")
    if not train:
        errors.append("data.train: required (HF hub id, a .jsonl/.parquet file or pkg.mod:fn)")
    if not model.path and model.init is None:
        errors.append("model.path: required unless model.init says how to build the policy")
    return errors


def _cross_checks(recipe: Recipe) -> list[str]:
    """Constraints between fields: each message names the key to change."""
    errors = required_fields(recipe.out_dir, recipe.data.train, recipe.model)
    if not recipe.reward.functions:
        errors.append("reward.functions: at least one reward function is required")
    elif recipe.reward.accuracy >= len(recipe.reward.functions):
        errors.append(f"reward.accuracy: index {recipe.reward.accuracy} but only "
                      f"{len(recipe.reward.functions)} reward functions")
    for i, fn in enumerate(recipe.reward.functions):
        if not fn.spec:
            errors.append(f"reward.functions.{i}.spec: required (e.g. math_accuracy or pkg.mod:fn)")
    if recipe.algo.mini_batches > recipe.train.prompts_per_step:
        errors.append(f"algo.mini_batches: {recipe.algo.mini_batches} mini-batches cannot split "
                      f"train.prompts_per_step={recipe.train.prompts_per_step} groups")
    if recipe.rollout.max_tokens >= recipe.rollout.max_model_len:
        errors.append(f"rollout.max_tokens: {recipe.rollout.max_tokens} leaves no room for the prompt in "
                      f"rollout.max_model_len={recipe.rollout.max_model_len}")
    if len(recipe.train.adam_betas) != 2 or not all(0 <= b < 1 for b in recipe.train.adam_betas):
        errors.append(f"train.adam_betas: two numbers in [0, 1) expected, got {recipe.train.adam_betas}")
    if recipe.eval.benchmark_max_tokens >= recipe.rollout.max_model_len:
        errors.append(f"eval.benchmark_max_tokens: {recipe.eval.benchmark_max_tokens} leaves no room for the prompt "
                      f"in rollout.max_model_len={recipe.rollout.max_model_len}")
    if recipe.model.checkpoint_every > 1 and not recipe.model.gradient_checkpointing:
        errors.append(f"model.checkpoint_every: {recipe.model.checkpoint_every} picks the blocks gradient "
                      "checkpointing recomputes, but model.gradient_checkpointing is false; turn it on or leave "
                      "checkpoint_every 1")
    if recipe.rollout.sleep_level and not recipe.rollout.num_gpus_per_engine:
        errors.append("rollout.sleep_level: vLLM sleep mode needs GPU engines (rollout.num_gpus_per_engine > 0)")
    if recipe.rollout.weight_sync == "cuda_ipc" and not _colocated(recipe):
        errors.append("rollout.weight_sync: cuda_ipc needs one engine per trainer rank sharing its GPU "
                      "(rollout.num_engines == train.num_trainers, rollout.tensor_parallel_size 1, "
                      "rollout.num_gpus_per_engine + train.num_gpus_per_trainer <= 1, both > 0)")
    if recipe.rollout.weight_sync == "collective" and \
            (recipe.rollout.num_gpus_per_engine > 0) != (recipe.train.num_gpus_per_trainer > 0):
        errors.append("rollout.weight_sync: collective needs engines and trainers on the same kind of device "
                      "(both on GPUs: NCCL, or both on CPUs: gloo)")
    if recipe.eval.num_prompts and not recipe.data.eval:
        errors.append("eval.num_prompts: set, but data.eval names no held-out set")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion that collects errors instead of stopping at the first one.


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


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls: type[R] = Recipe,
                cross_checks: Callable[[R], list[str]] | None = None) -> R:
    """Read a recipe YAML (or start empty with `path=None`), apply overrides, check everything, return it.

    cls: the recipe dataclass (`Recipe` for GRPO, `sse_rl.sft.SFTRecipe`, ...); cross_checks: its constraints
    between fields, reported together with the type and bound errors (default: the GRPO ones for `Recipe`)."""
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
    errors: list[str] = []
    recipe = _build(cls, raw, "", errors)
    if cross_checks is None and cls is Recipe:
        cross_checks = _cross_checks
    if cross_checks is not None:
        errors += cross_checks(recipe)
    if errors:
        raise RecipeError(errors)
    return recipe
