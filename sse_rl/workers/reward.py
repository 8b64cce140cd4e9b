"""The reward worker: owns one `RewardPool` (sandboxed grading processes with hard per-call timeouts).

Rewards are called as TRL calls them (`sse_rl.rewards.calling`), with the controller's step as `trainer_state`. A
reward that hangs is killed at `timeout_s` and scores 0; a grading process that dies is replaced and its sample
scores 0; both are counted in the result, and the step goes on. A reward function that raises is a bug and stops
the run with its traceback (RewardFunctionError).
"""
from __future__ import annotations

from typing import Any

from sse_rl.config import RewardConfig
from sse_rl.rewards.calling import TrainerState
from sse_rl.rewards.pool import RewardPool, RewardResult, RewardSpec
from sse_rl.rewards.sandbox import SandboxConfig


def reward_specs(cfg: RewardConfig) -> list[RewardSpec]:
    return [RewardSpec(fn.spec, weight=fn.weight, kwargs=dict(fn.kwargs)) for fn in cfg.functions]


class RewardWorker:
    """Made a Ray actor by the controller (`ray.remote(RewardWorker)`)."""

    def __init__(self, cfg: RewardConfig):
        self.pool = RewardPool(reward_specs(cfg), SandboxConfig(workers=cfg.num_workers, timeout_s=cfg.timeout_s),
                               max_timeouts=cfg.max_timeouts, zero_non_finite=cfg.non_finite == "zero")
        self.names = list(self.pool.weights)

    def score(self, prompts: list[Any], completions: list[str], trainer_state: TrainerState | None = None,
              **columns: list[Any]) -> RewardResult:
        """`RewardPool.score`: columns are dataset columns by keyword, one value per completion."""
        return self.pool.score(prompts, completions, trainer_state=trainer_state, **columns)

    def function_names(self) -> list[str]:
        return self.names

    def close(self) -> None:
        self.pool.close()
