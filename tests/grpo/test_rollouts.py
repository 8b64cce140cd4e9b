"""Rollout collection with dynamic-sampling refill, reward bookkeeping and batching, on fake engines and rewards."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sse_rl.data import EpochSampler, Prompt
from sse_rl.grpo.advantages import build_advantage_fn
from sse_rl.grpo.losses import build_loss_agg
from sse_rl.rewards.pool import RewardError, RewardResult
from sse_rl.eval.engines import rank_seed
from sse_rl.rollouts import Group, Round, batches, call_seed, collect, reward_inputs, to_groups
from sse_rl.workers.rollout import Rollout

G = 4
# Prompt i has signal (accuracy not the same for all completions) unless i % 3 == 0.
PROMPTS = [Prompt(i, f"p{i}", {"answer": str(i)}, ids=[1, 2, i + 3]) for i in range(30)]


def _rollouts(prompt: Prompt) -> list[Rollout]:
    """G fake completions; completion k has k + 1 tokens and the last one hits the length limit."""
    return [Rollout([0] * (k + 1), [-0.5] * (k + 1), f"{prompt.index}:{k}", "length" if k == G - 1 else "stop")
            for k in range(G)]


def _group(prompt: Prompt) -> Group:
    acc = [0.0] * G if prompt.index % 3 == 0 else [1.0, 0.0, 1.0, 0.0]
    return Group(prompt, _rollouts(prompt), rewards=list(acc), accuracy=acc, per_function={"acc": acc})


class FakeEngines:
    """Stands in for generate + score: records the rounds it was asked for."""

    def __init__(self):
        self.calls: list[tuple[list[int], int]] = []

    def __call__(self, prompts: list[Prompt], rnd: int) -> Round:
        self.calls.append(([p.index for p in prompts], rnd))
        return Round([_group(p) for p in prompts], rollout_s=2.0, reward_s=0.5, timeouts=1, errors=2,
                     skipped=3, non_finite=4)


def _collect(dynamic: bool, max_rounds: int, per_step: int = 6):
    sampler, engines = EpochSampler(len(PROMPTS), seed=0), FakeEngines()
    kept, metrics, drawn = collect(sampler, PROMPTS, engines, prompts_per_step=per_step, dynamic=dynamic,
                                   max_rounds=max_rounds)
    return kept, metrics, drawn, engines.calls, EpochSampler(len(PROMPTS), seed=0).take(len(drawn))


def test_dynamic_sampling_refills_with_groups_that_have_signal():
    kept, metrics, drawn, calls, order = _collect(dynamic=True, max_rounds=5)
    assert drawn == order and len(drawn) == 6 * len(calls)  # every drawn row counts, used or not
    assert [rnd for _, rnd in calls] == list(range(len(calls))) and len(calls) >= 2  # one round had too few
    with_signal = [i for i in drawn if i % 3]
    assert [g.prompt.index for g in kept] == with_signal[:6]  # in draw order, cut at a full batch
    assert sum(1 for i in drawn[:-6] if i % 3) < 6 <= len(with_signal)  # it stopped at the first full batch
    rounds = float(len(calls))
    assert metrics["sampling/rounds"] == rounds and metrics["sampling/kept_groups"] == 6.0
    assert metrics["time/rollout"] == 2.0 * rounds and metrics["time/reward"] == 0.5 * rounds
    assert metrics["reward/timeouts"] == rounds and metrics["reward/errors"] == 2 * rounds
    assert metrics["reward/skipped"] == 3 * rounds and metrics["reward/non_finite"] == 4 * rounds
    # rollout metrics cover every scored group of the step, kept or not
    zero = sum(1 for i in drawn if i % 3 == 0) / len(drawn)
    assert metrics["sampling/zero_variance_frac"] == pytest.approx(zero)
    assert metrics["accuracy"] == pytest.approx(0.5 * (1 - zero)) and metrics["reward/acc/mean"] == metrics["accuracy"]
    assert metrics["response_length/mean"] == 2.5 and metrics["response_length/max"] == 4.0
    assert metrics["response_length/truncated_frac"] == 1 / G
    assert metrics["throughput/rollout_tokens_per_s"] == 10 * len(drawn) / (2.0 * rounds)  # 1+2+3+4 tokens a group


def test_without_dynamic_sampling_one_round_is_kept_whole():
    kept, metrics, drawn, calls, _ = _collect(dynamic=False, max_rounds=5)
    assert len(calls) == 1 and [g.prompt.index for g in kept] == drawn  # zero-variance groups included
    assert metrics["sampling/rounds"] == 1.0 and metrics["sampling/kept_groups"] == 6.0


def test_refill_stops_at_max_rounds_with_a_short_batch():
    kept, metrics, drawn, calls, _ = _collect(dynamic=True, max_rounds=1, per_step=6)
    assert len(calls) == 1 and len(kept) == sum(1 for i in drawn if i % 3) < 6
    assert metrics["sampling/kept_groups"] == float(len(kept))


def test_reward_inputs_and_groups_follow_prompt_order():
    prompts = PROMPTS[:2]
    sampled = [_rollouts(p) for p in prompts]
    texts, completions, columns = reward_inputs(prompts, sampled)
    assert texts == ["p0"] * G + ["p1"] * G and completions[G] == "1:0"
    assert columns["answer"] == ["0"] * G + ["1"] * G and columns["completion_ids"][1] == [0, 0]
    result = RewardResult(total=[1.0, None, 0.5, 0.0] + [0.0, 1.0, 1.0, None],
                          per_function={"fmt": [1.0] * 8, "acc": [1.0, None, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]},
                          timeouts=0, errors=[RewardError("acc", 1, "timeout", "")])
    groups = to_groups(prompts, sampled, result, accuracy="acc")
    assert [g.prompt.index for g in groups] == [0, 1] and groups[1].rollouts == sampled[1]
    chat = [dataclasses.replace(p, messages=[{"role": "user", "content": p.text}]) for p in prompts]
    assert reward_inputs(chat, sampled)[0][G] == [{"role": "user", "content": "p1"}]  # conversational, as TRL
    assert groups[0].rewards[0] == 1.0 and math.isnan(groups[0].rewards[1])  # None: unscored (NaN, as TRL)
    assert groups[0].rewards[2:] == [0.5, 0.0] and groups[1].rewards[:3] == [0.0, 1.0, 1.0]
    assert groups[0].accuracy == [1.0, 0.0, 0.0, 0.0] and groups[1].per_function["fmt"] == [1.0] * G


@pytest.mark.parametrize("overlong_filter", [False, True], ids=["keep-overlong", "filter-overlong"])
def test_batches_weigh_pack_and_spread_the_groups(overlong_filter):
    groups = [_group(PROMPTS[i]) for i in (1, 2, 4, 5, 7)]  # 20 sequences of 1-4 completion tokens, all with signal
    per_rank = batches(groups, build_advantage_fn("none"), build_loss_agg("dapo", max_tokens=4), mini_batches=2,
                       overlong_filter=overlong_filter, token_budget=16, num_ranks=2)
    assert len(per_rank) == 2 and all(len(minis) == 2 for minis in per_rank)  # per rank: one list per mini-batch
    for j, share in enumerate([3, 2]):  # mini-batch j gets groups j, j + 2, ...: 3 and 2 groups
        micro = [mb for rank in per_rank for mb in rank[j]]
        assert all(mb.num_tokens <= 16 for mb in micro)
        prompt_tokens = {t for mb in micro for t in mb.input_ids[0].tolist()} - {0, 1, 2}  # each prompt's own token
        assert prompt_tokens == {g.prompt.ids[-1] for g in groups[j::2]}
        assert sum(mb.num_tokens for mb in micro) == share * (G * 3 + 10)  # 3 prompt tokens each
        weights = torch.cat([mb.weights for mb in micro])  # [N] one per completion token
        kept = share * (6 if overlong_filter else 10)  # the 4-token completion is truncated
        assert float(weights.sum()) == pytest.approx(1.0)  # dapo: 1 / (the mini-batch's kept tokens) each
        assert int((weights > 0).sum()) == kept
        # advantages: rewards minus the group mean (no std scaling), per completion token
        assert sorted(set(torch.cat([mb.advantages for mb in micro]).tolist())) == [-0.5, 0.5]


def test_call_seeds_differ_between_calls_and_engines_and_fit_torch():
    """Every rollout call of a run (step, round; eval -1) gets its own seed, engine r of a call rank_seed(seed, r):
    no two (call, engine) pairs may share a random stream, and every seed must be one `torch.manual_seed` accepts."""
    calls = [(step, rnd) for step in range(1, 200) for rnd in range(4)] + [(-1,)]
    seeds = [rank_seed(call_seed(0, *c), engine) for c in calls for engine in range(8)]
    assert len(set(seeds)) == len(seeds)
    assert call_seed(0, 1, 0) == call_seed(0, 1, 0) != call_seed(1, 1, 0)
    torch.manual_seed(max(seeds))
