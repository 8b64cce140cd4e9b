"""The non-finite guard and steps that train nothing (`sse_rl.grpo.guard`): each fault injected into a controller
on fake actors, the outcome asserted (the error, the step and quantity it names, what was synced and saved)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sse_rl.config import Recipe
from sse_rl.controller import Controller
from sse_rl.data import Prompt
from sse_rl.grpo.advantages import build_advantage_fn
from sse_rl.grpo.guard import NonFiniteError, RunStopped, StreakLimit
from sse_rl.grpo.losses import build_loss_agg
from sse_rl.rewards.pool import RewardResult
from sse_rl.rollouts import Group, batches, to_groups
from sse_rl.step_stats import StepStats
from sse_rl.weight_sync import check
from sse_rl.workers.rollout import Rollout

G = 4
NAN = float("nan")
PROMPTS = [Prompt(i, f"p{i}", {"answer": str(i)}, ids=[1, 2, i + 3]) for i in range(40)]


class FakeActors:
    """Engines, reward pool and trainers in one: each fault is a knob; records syncs and saves by step."""

    reward_names = ["acc", "bonus"]

    def __init__(self, *, reward=None, stats=None, probe=lambda step: 0.0, non_finite=0):
        self.reward = reward or (lambda k: float(k % 2))  # completion k's accuracy: the groups vary
        self.stats = stats or (lambda step: StepStats(updates=1.0))
        self.probe = probe
        self.non_finite = non_finite  # values the pool scored 0 per score call (reward.non_finite "zero")
        self.step = 0  # trainer updates so far
        self.synced: list[int] = []
        self.saved: list[int] = []

    def generate(self, ids, sampling, seed):
        return [[Rollout([5], [-1.0], str(k), "stop") for k in range(sampling.n)] for _ in ids]

    def score(self, texts, completions, **columns):
        acc = [self.reward(int(c)) for c in completions]
        return RewardResult(total=list(acc), per_function={"acc": acc, "bonus": [0.0] * len(acc)}, timeouts=0,
                            errors=[], non_finite=self.non_finite)

    def sleep(self):
        return {}

    def train(self, per_rank):
        self.step += 1
        return [self.stats(self.step)]

    def sync(self, probe_ids):
        self.synced.append(self.step)
        return {"probe/max_abs_diff": self.probe(self.step)}

    def save(self, path):
        self.saved.append(self.step)
        (Path(path) / "trainer.pt").write_bytes(b"")


def _run(tmp_path: Path, fake: FakeActors, steps: int = 6, dynamic_sampling: bool = True, **train) -> Controller:
    recipe = Recipe(out_dir=str(tmp_path))
    recipe.algo.dynamic_sampling = dynamic_sampling
    recipe.rollout.group_size, recipe.rollout.max_tokens = G, 1
    recipe.train.steps, recipe.train.prompts_per_step = steps, 4
    for key, value in train.items():
        setattr(recipe.train, key, value)
    recipe.run.save_every, recipe.run.report_to, recipe.run.progress = 2, [], False
    controller = Controller(recipe, tmp_path, "policy", PROMPTS, [])
    controller.actors = fake
    controller.run(0)
    return controller


def test_a_nan_reward_names_the_function_and_the_sample():
    sampled = [[Rollout([5], [-1.0], str(k), "stop") for k in range(G)] for _ in range(2)]
    result = RewardResult(total=[1.0] * 8, per_function={"acc": [1.0] * 8, "bonus": [0.0] * 6 + [NAN, 0.0]},
                          timeouts=0, errors=[])
    with pytest.raises(NonFiniteError, match=r"reward function 'bonus' returned nan for completion 2 of dataset "
                                             r"row 7 \(prompt 'p7'\)"):
        to_groups([PROMPTS[3], PROMPTS[7]], sampled, result, accuracy="acc")


def test_non_finite_advantages_stop_batching():
    group = Group(PROMPTS[0], [Rollout([5], [-1.0], "", "stop")] * G, [0.0, 1.0, 0.0, 1.0], [0.0] * G, {})
    with pytest.raises(NonFiniteError, match="advantages: 4 of 4 are not finite"):
        batches([group], lambda r: build_advantage_fn("group")(r) * NAN, build_loss_agg("dapo", 1), mini_batches=1,
                overlong_filter=False, token_budget=64, num_ranks=1)


def test_probe_nan_fails_where_a_large_difference_only_warns(caplog):
    with caplog.at_level(logging.WARNING):
        check(0.5, 1e-3, step=4)
    assert "step 4: engine and trainer first-token logprobs differ" in caplog.text
    for bad in (NAN, float("inf")):
        with pytest.raises(NonFiniteError, match="probe/max_abs_diff is (nan|inf)"):
            check(bad, 1e-3, step=4)


def test_streak_limit_counts_faults_in_a_row_only():
    streak = StreakLimit(2)
    assert [streak.record(f) for f in (True, False, True, True)] == [False, False, False, True]


def test_nan_reward_stops_the_run_naming_step_function_and_sample(tmp_path):
    fake = FakeActors(reward=lambda k: NAN if k == 3 else float(k % 2))
    with pytest.raises(RunStopped, match=r"run stopped at step 1: reward function 'acc' returned nan for "
                                         r"completion 3 of dataset row \d+") as info:
        _run(tmp_path, fake)
    assert "no checkpoint was saved" in str(info.value)
    assert fake.synced == [0] and fake.saved == []  # the start-up sync only


def test_non_finite_rewards_the_pool_scored_0_are_counted_in_the_step_metrics(tmp_path):
    _run(tmp_path, FakeActors(non_finite=2), steps=2, dynamic_sampling=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["reward/non_finite"] for row in rows if "reward/non_finite" in row] == [2.0, 2.0]


def test_non_finite_weights_stop_before_sync_and_save(tmp_path):
    fake = FakeActors(stats=lambda step: StepStats(updates=1.0, lr=float("inf"), nonfinite_weights=float(step > 2)))
    with pytest.raises(RunStopped, match=r"run stopped at step 3: weights after the update: 1 non-finite values "
                                         r"\(train/grad_norm 0.0, train/lr inf\)") as info:
        _run(tmp_path, fake)
    assert fake.synced == [0, 1, 2] and fake.saved == [2]  # step 3's weights reach neither engines nor disk
    assert f"resume from {tmp_path / 'checkpoints' / 'step_000002'} with --resume" in str(info.value)


def test_skipped_updates_stop_the_run_after_max_skipped_steps_in_a_row(tmp_path, caplog):
    # steps 1 and 3-5 skip their update: the streak of step 1 is broken by step 2, steps 3-5 reach the limit of 3
    fake = FakeActors(stats=lambda step: StepStats(updates=1.0, skipped=float(step != 2), grad_norm=float("inf"),
                                                   loss=NAN))
    with caplog.at_level(logging.WARNING), pytest.raises(RunStopped, match=(
            r"run stopped at step 5: 3 steps in a row skipped their update for a non-finite loss or gradient "
            r"\(train/loss nan, train/grad_norm inf\)")):
        _run(tmp_path, fake, steps=8, max_skipped_steps=3)
    assert "step 4: 1 of 1 updates skipped" in caplog.text and "(2 such steps in a row" in caplog.text
    assert fake.saved == [2, 4]


def test_a_skipped_step_within_the_limit_goes_on(tmp_path):
    fake = FakeActors(stats=lambda step: StepStats(updates=1.0, skipped=float(step % 2), grad_norm=float("inf")))
    _run(tmp_path, fake, steps=4, max_skipped_steps=2)
    assert fake.saved == [2, 4]


def test_steps_that_train_nothing_stop_the_run_after_max_empty_steps(tmp_path, caplog):
    fake = FakeActors(reward=lambda k: 0.0)  # a reward that never varies: every group all wrong
    with caplog.at_level(logging.WARNING), pytest.raises(RunStopped, match=(
            r"run stopped at step 3: 3 steps in a row trained nothing: no kept group had rewards that vary")):
        _run(tmp_path, fake, max_empty_steps=3)
    assert "step 2 trains nothing: 0 kept groups" in caplog.text
    assert fake.step == 0 and fake.saved == [0]  # dynamic sampling kept no group: no update, step 2 saved as it was


def test_without_dynamic_sampling_groups_without_variance_count_as_empty(tmp_path):
    fake = FakeActors(reward=lambda k: 1.0)  # every group all right, all kept: advantages all 0
    with pytest.raises(RunStopped, match="run stopped at step 2: 2 steps in a row trained nothing"):
        _run(tmp_path, fake, dynamic_sampling=False, max_empty_steps=2)
    assert fake.step == 1  # step 1 trained its kept groups (the router aux loss still learns); step 2 stopped first
