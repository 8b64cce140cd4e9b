"""From prompts to the trainers' micro-batches, as pure functions: no Ray, no engines (the controller passes in the
calls that reach them).

Choices:
1) Dynamic sampling (DAPO): rounds of `prompts_per_step` fresh prompts are generated and scored until that many
   groups have reward signal (accuracy not the same for all G completions) or `algo.max_sampling_rounds` is spent;
   without it one round is kept whole. Every drawn prompt counts as drawn (the sampler's epoch), used or not.
2) Each rollout call restarts the engines' random streams from a seed hashed from (run seed, step, round), so a
   resumed run draws the same completions as an uninterrupted one.
3) Rollout metrics cover every scored group of the step, kept or not; rewards the pool could not give (None) count
   as 0. A reward function that returns a non-finite value is a bug in it: `NonFiniteError` names the function and
   the sample, and the run stops (`sse_rl.grpo.guard`); with reward.non_finite "zero" the pool has scored such a
   value 0 instead, and the step counts it (reward/non_finite).
4) Batching: group-normalised advantages, then per mini-batch (groups dealt round-robin) the loss-aggregation weight
   of each sequence (0 for overlong-filtered ones), then packing by token budget over the trainer ranks.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sse_rl.data import EpochSampler, Prompt
from sse_rl.grpo.filters import group_has_variance, loss_keep_mask
from sse_rl.grpo.guard import NonFiniteError
from sse_rl.packing import MicroBatch, Sequence as PackedSequence, pack
from sse_rl.rewards.pool import RewardResult
from sse_rl.workers.rollout import Rollout


@dataclass
class Group:
    """One prompt with its G scored completions."""

    prompt: Prompt
    rollouts: list[Rollout]
    rewards: list[float]  # weighted total per completion; NaN where no function scored it (no advantage, as TRL)
    accuracy: list[float]  # raw value of the accuracy function per completion
    per_function: dict[str, list[float]]  # every reward function's raw value per completion


@dataclass
class Round:
    """One round of sampling: the scored groups of its prompts, and what it cost."""

    groups: list[Group]
    rollout_s: float  # generating
    reward_s: float  # grading
    timeouts: int  # completions the reward pool timed out on (scored 0)
    errors: int  # completions the reward pool failed on (scored 0), skipped ones included
    skipped: int = 0  # completions not graded: their reward had timed out max_timeouts times this step (scored 0)
    non_finite: int = 0  # (reward, completion) pairs valued NaN or inf, scored 0 (reward.non_finite "zero")
    retried: int = 0  # reward calls on several completions that failed and were redone one completion at a time
    logged: dict[str, list[float]] = field(default_factory=dict)  # what rewards logged with log_metric, by name


def call_seed(seed: int, *parts: int) -> int:
    """The sampling seed of one rollout call from the run seed and the call's coordinates (step, round; -1 for the
    held-out eval), hashed so that no two calls of a run share a random stream. Below 2**62, so that engine i's
    seed + i stays in the range of `torch.manual_seed`."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**62


def reward_inputs(prompts: list[Prompt], rollouts: list[list[Rollout]]) -> tuple[list[Any], list[str],
                                                                                   dict[str, list[Any]]]:
    """What the reward pool grades: (prompts, completion texts, dataset columns + completion_ids), one entry per
    completion, prompt by prompt. A prompt is its chat messages where the data has them (the pool then hands rewards
    conversational completions, as TRL does), else its text."""
    flat = [(p, r) for p, rs in zip(prompts, rollouts) for r in rs]
    columns: dict[str, list[Any]] = {key: [p.columns[key] for p, _ in flat] for key in prompts[0].columns}
    columns["completion_ids"] = [r.completion_ids for _, r in flat]
    return [p.text if p.messages is None else p.messages for p, _ in flat], [r.text for _, r in flat], columns


def to_groups(prompts: list[Prompt], rollouts: list[list[Rollout]], result: RewardResult,
              accuracy: str) -> list[Group]:
    """One Group per prompt from the pool's flat result; `accuracy` names the function whose value is accuracy."""
    g = len(rollouts[0])
    _check_finite(prompts, result, g)

    def rows(values: list[float | None], unscored: float) -> list[list[float]]:
        values = [unscored if v is None else v for v in values]
        return [values[i:i + g] for i in range(0, len(values), g)]

    per_function = {name: rows(values, 0.0) for name, values in result.per_function.items()}
    return [Group(p, rs, total, per_function[accuracy][i], {name: v[i] for name, v in per_function.items()})
            for i, (p, rs, total) in enumerate(zip(prompts, rollouts, rows(result.total, math.nan)))]


def _check_finite(prompts: list[Prompt], result: RewardResult, g: int) -> None:
    """NonFiniteError naming the first reward function and sample (prompt row, completion) with a non-finite value."""
    for name, values in result.per_function.items():
        for i, v in enumerate(values):
            if v is not None and not math.isfinite(v):
                prompt = prompts[i // g]
                raise NonFiniteError(f"reward function {name!r} returned {v} for completion {i % g} of dataset row "
                                     f"{prompt.index} (prompt {prompt.text[:80]!r})")


def has_signal(groups: list[Group]) -> bool:
    """Whether any group's rewards vary: otherwise every advantage is 0 and the step trains nothing."""
    return bool(groups) and bool(group_has_variance(torch.tensor([g.rewards for g in groups])).any())


def collect(sampler: EpochSampler, prompts: Sequence[Prompt], sample: Callable[[list[Prompt], int], Round], *,
            prompts_per_step: int, dynamic: bool, max_rounds: int) -> tuple[list[Group], dict[str, float], list[int]]:
    """Sample rounds until `prompts_per_step` groups have signal (choice 1); `sample(prompts, round)` generates and
    scores one round. Returns the kept groups, the rollout metrics and the dataset rows drawn (all rounds)."""
    kept: list[Group] = []
    rounds: list[Round] = []
    drawn: list[int] = []
    for rnd in range(max_rounds if dynamic else 1):
        batch = sampler.take(prompts_per_step)
        drawn += batch
        rounds.append(sample([prompts[i] for i in batch], rnd))
        groups = rounds[-1].groups
        signal = group_has_variance(torch.tensor([g.accuracy for g in groups])).tolist()
        kept += [g for g, ok in zip(groups, signal) if ok or not dynamic]
        if len(kept) >= prompts_per_step:
            break
    return kept[:prompts_per_step], round_metrics(rounds, min(len(kept), prompts_per_step)), drawn


def round_metrics(rounds: list[Round], kept: int) -> dict[str, float]:
    """The step's sampling metrics: what rewards logged (`logged_metrics`; a built-in name wins a clash), phase times
    and pool failures summed over the rounds, then `rollout_metrics`."""
    groups = [g for r in rounds for g in r.groups]
    rollout_s = sum(r.rollout_s for r in rounds)
    generated = sum(len(r.completion_ids) for g in groups for r in g.rollouts)
    return {**logged_metrics(rounds), "time/rollout": rollout_s, "time/reward": sum(r.reward_s for r in rounds),
            "reward/timeouts": float(sum(r.timeouts for r in rounds)),
            "reward/errors": float(sum(r.errors for r in rounds)),
            "reward/skipped": float(sum(r.skipped for r in rounds)),
            "reward/non_finite": float(sum(r.non_finite for r in rounds)),
            "reward/retried": float(sum(r.retried for r in rounds)),
            **rollout_metrics(groups), "sampling/rounds": float(len(rounds)),
            "throughput/rollout_tokens_per_s": generated / rollout_s, "sampling/kept_groups": float(kept)}


def logged_metrics(rounds: list[Round]) -> dict[str, float]:
    """`reward/<name>`: the mean of every value the rewards logged under `name` with TRL's `log_metric` this step
    (TRL averages a logging step's values the same way)."""
    names = {name for r in rounds for name in r.logged}
    return {f"reward/{name}": mean([v for r in rounds for v in r.logged.get(name, [])]) for name in sorted(names)}


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    """Reward, accuracy and length statistics of scored groups, and the share of groups without signal."""
    rewards = torch.tensor([r for g in groups for r in g.rewards])  # [B], NaN where unscored
    scored = rewards[~rewards.isnan()]
    lengths = [len(r.completion_ids) for g in groups for r in g.rollouts]
    truncated = [r.finish_reason == "length" for g in groups for r in g.rollouts]
    no_signal = (~group_has_variance(torch.tensor([g.accuracy for g in groups]))).float().mean()
    out = {"reward/mean": float(scored.mean()), "reward/std": float(scored.std()) if len(scored) > 1 else 0.0,
           "reward/unscored_frac": float(rewards.isnan().float().mean()),
           "accuracy": mean([a for g in groups for a in g.accuracy]),
           "response_length/mean": mean(lengths), "response_length/max": float(max(lengths)),
           "response_length/truncated_frac": mean([float(t) for t in truncated]),
           "sampling/zero_variance_frac": float(no_signal)}
    for name in groups[0].per_function:
        out[f"reward/{name}/mean"] = mean([v for g in groups for v in g.per_function[name]])
    return out


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def batches(groups: list[Group], advantages: Callable[[Tensor], Tensor], loss_agg: Callable[[Tensor], Tensor], *,
            mini_batches: int, overlong_filter: bool, token_budget: int,
            num_ranks: int) -> list[list[list[MicroBatch]]]:
    """Advantages, loss weights and packing (choice 4): per rank, per mini-batch, its micro-batches."""
    values = advantages(torch.tensor([g.rewards for g in groups]))  # [P, G]
    if not torch.isfinite(values).all():
        raise NonFiniteError(f"advantages: {int((~torch.isfinite(values)).sum())} of {values.numel()} are not finite")
    adv = values.tolist()  # [P][G]
    n_mini = min(mini_batches, len(groups))
    per_rank: list[list[list[MicroBatch]]] = [[] for _ in range(num_ranks)]
    for j in range(n_mini):
        items = [(groups[i], adv[i][k], r) for i in range(j, len(groups), n_mini)
                 for k, r in enumerate(groups[i].rollouts)]
        keep = loss_keep_mask([r.finish_reason for _, _, r in items], overlong_filter)  # [S]
        lengths = torch.tensor([len(r.completion_ids) for _, _, r in items]) * keep  # [S]
        weights = (loss_agg(lengths) * keep).tolist()  # [S]
        seqs = [PackedSequence(g.prompt.ids, r.completion_ids, r.logprobs, a, w, routes=r.routes)
                for (g, a, r), w in zip(items, weights)]
        for rank, micro in enumerate(pack(seqs, token_budget, num_ranks)):
            per_rank[rank].append(micro)
    return per_rank
