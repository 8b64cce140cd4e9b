"""Every configuration sse-rl runs from, and the one check each gets before a command does anything.

Kinds, one dataclass tree each: `Recipe` (`sse-rl train`, GRPO), `SFTRecipe` (`sse-rl sft`) and `DistillRecipe`
(`sse-rl distill`) are YAML plus dotted overrides; `EvalRecipe` (`sse-rl eval`) comes from the command's flags.
`SamplingConfig` is what one generation call samples, for rollouts, the held-out eval, validation and `sse-rl eval`.
Defaults live in the schemas and only there; code reads fields, never `cfg.get(key, default)`.

Which module holds what (import from `sse_rl.config`; the names below are re-exported here):
- `reading`: YAML + dotted overrides -> a dataclass tree (`build_recipe`, `apply_override`), types, bounds
  (`bounded`) and unknown keys checked while building, `RecipeError`, and `write_recipe` (the resolved config.yaml).
- `grpo`, `sft`, `distill`, `eval`: one recipe kind each, its schema and the constraints between its fields
  (`grpo_rules`, ...); `grpo` also resolves the weight-sync transport (`resolve_sync_method`), `eval` holds the
  files of an eval run folder.
- `sampling`: `SamplingConfig` and its seeding rule.
- `checks`: where a recipe is checked: `parse_recipe` (read and build), `load_recipe` (+ the rules between fields),
  `validate` (+ what the recipe names: files, data sources, models, tokenizers, reward specs, benchmarks).
"""
from sse_rl.config.checks import load_recipe, parse_recipe, validate
from sse_rl.config.distill import (
    STAGES,
    DistillDataConfig,
    DistillRecipe,
    DistillRunConfig,
    DistillTrainConfig,
    LogitsStageConfig,
    StageConfig,
    StudentConfig,
    TeacherConfig,
)
from sse_rl.config.eval import (
    COMPLETIONS_FILE,
    DEFAULT_BENCHMARKS,
    EVAL_CONFIG_FILE,
    EVAL_SAMPLING,
    GENERATION_KEYS,
    STANDARD_INSTRUCTION,
    EvalRecipe,
)
from sse_rl.config.grpo import (
    AlgoConfig,
    DataConfig,
    InitConfig,
    ModelConfig,
    Recipe,
    RewardConfig,
    RewardFunctionConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    TrainEvalConfig,
    resolve_sync_method,
)
from sse_rl.config.reading import RESOLVED_FILE, RecipeError, apply_override, bounded, build_recipe, write_recipe
from sse_rl.config.sampling import SamplingConfig
from sse_rl.config.sft import SFTDataConfig, SFTRecipe, SFTRunConfig, SFTTrainConfig

__all__ = [
    "COMPLETIONS_FILE", "DEFAULT_BENCHMARKS", "EVAL_CONFIG_FILE", "EVAL_SAMPLING", "GENERATION_KEYS", "RESOLVED_FILE",
    "STAGES", "STANDARD_INSTRUCTION",
    "AlgoConfig", "DataConfig", "InitConfig", "ModelConfig", "Recipe", "RewardConfig", "RewardFunctionConfig",
    "RolloutConfig", "RunConfig", "TrainConfig", "TrainEvalConfig",
    "SFTDataConfig", "SFTRecipe", "SFTRunConfig", "SFTTrainConfig",
    "DistillDataConfig", "DistillRecipe", "DistillRunConfig", "DistillTrainConfig", "LogitsStageConfig",
    "StageConfig", "StudentConfig", "TeacherConfig",
    "EvalRecipe", "SamplingConfig",
    "RecipeError", "apply_override", "bounded", "build_recipe", "load_recipe", "parse_recipe",
    "resolve_sync_method", "validate", "write_recipe",
]
