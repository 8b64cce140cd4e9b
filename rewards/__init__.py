"""Verifiable rewards with TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`.

`math_accuracy`, `format_reward` (name "format") and `overlong` are plain functions (usable in TRL as-is);
`load_reward(spec)` resolves names, `module:function`, `file.py:function` and entry points; `RewardPool` grades a
batch with several weighted rewards in sandboxed worker processes (hard timeouts, memory bound), calling each as
TRL's GRPOTrainer does (`calling.py`); `probe` calls one once in-process, as recipe checks do.
"""
from sse_rl.rewards.calling import RewardBatch, RewardCaller, TrainerState
from sse_rl.rewards.math_reward import GoldAnswerWarning, grade, math_accuracy
from sse_rl.rewards.pool import RewardError, RewardFunctionError, RewardPool, RewardResult, RewardSpec, probe
from sse_rl.rewards.registry import BUILTINS, ENTRY_POINT_GROUP, RewardSpecError, load_reward
from sse_rl.rewards.sandbox import RewardTimeoutWarning, RewardWarning, Sandbox, SandboxConfig, SandboxError
from sse_rl.rewards.shaping import combine, format_reward, overlong

__all__ = [
    "BUILTINS", "ENTRY_POINT_GROUP", "GoldAnswerWarning", "RewardBatch", "RewardCaller", "RewardError",
    "RewardFunctionError", "RewardPool", "RewardResult", "RewardSpec", "RewardSpecError", "RewardTimeoutWarning",
    "RewardWarning", "Sandbox", "SandboxConfig", "SandboxError", "TrainerState", "combine", "format_reward", "grade",
    "load_reward", "math_accuracy", "overlong", "probe",
]
