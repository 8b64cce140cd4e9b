"""RewardPool end to end: real math-verify in spawned workers, peer agreement, weights, errors, async, no leaks."""
import asyncio
import functools
import json
import logging
import math
import time
from pathlib import Path

import psutil
import pytest
from reward_procs import kill_and_wait, reward_children
from sse_rl.rewards import (
    RewardFunctionError,
    RewardPool,
    RewardSpec,
    RewardSpecError,
    SandboxConfig,
    overlong,
)

USER = Path(__file__).with_name("user_rewards.py")
TIMEOUT_S = 2.0
PEER = "peer_graded/qwen25math_harness_math_cot_100_flat.jsonl"



@pytest.fixture(scope="module")
def pool():
    rewards = [
        "math_accuracy",
        RewardSpec("format", weight=0.5),
        RewardSpec("overlong", weight=2.0, kwargs={"max_length": 10, "cache_length": 4}),
        RewardSpec(f"{USER}:misbehave", name="user"),
    ]
    with RewardPool(rewards, SandboxConfig(workers=2, timeout_s=TIMEOUT_S, memory_mb=1024)) as p:
        yield p


def _score(pool, completions, answers, ids=None):
    ids = ids or [[0]] * len(completions)
    return pool.score(["p"] * len(completions), completions, answer=answers, completion_ids=ids)


def test_agreement_with_peer_grader_through_the_pool(shared_data):
    rows = [json.loads(line) for line in (shared_data / PEER).read_text().splitlines()]
    with RewardPool(["math_accuracy"], SandboxConfig(workers=2)) as pool:
        result = pool.score([r["problem"] for r in rows], [r["completion"] for r in rows],
                            answer=[r["gold"] for r in rows])
    agree = sum((v == 1.0) == r["peer_correct"] for v, r in zip(result.per_function["math_accuracy"], rows))
    assert agree >= 799, f"agreement {agree}/800"
    assert result.timeouts == 0 and result.total == result.per_function["math_accuracy"]


def test_weighted_total_keeps_per_reward_values(pool):
    completions = [r"<think>a</think>\boxed{12}", r"\boxed{12}", r"<think>a</think>\boxed{7}"]
    result = _score(pool, completions, ["12", "12", "12"], ids=[[0] * 6, [0] * 8, [0] * 10])
    assert result.per_function == {"math_accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0],
                                   "overlong": [0.0, -0.5, -1.0], "user": [1.0, 1.0, 1.0]}
    assert result.total == pytest.approx([2.5, 1.0, -0.5])
    assert result.timeouts == 0 and result.errors == []
    assert result.metrics()["reward/math_accuracy/mean"] == pytest.approx(2 / 3)


def test_chat_completions_and_int_answers(pool):
    chat = [[{"role": "assistant", "content": r"<think>a</think>\boxed{033}"}]]
    result = pool.score([[{"role": "user", "content": "q"}]], chat, answer=[33], completion_ids=[[0]])
    assert result.per_function["math_accuracy"] == [1.0] and result.per_function["format"] == [1.0]


def test_unparseable_gold_is_reported_not_zero(pool):
    result = _score(pool, [r"\boxed{1}", r"\boxed{1}"], ["", "1"])
    assert result.per_function["math_accuracy"] == [None, 1.0]
    assert [(e.function, e.index, e.kind) for e in result.errors] == [("math_accuracy", 0, "GoldAnswerWarning")]
    with RewardPool(["math_accuracy"], SandboxConfig(workers=1)) as one_worker:  # one call on both samples
        together = one_worker.score(["p"] * 2, [r"\boxed{1}"] * 2, answer=["", "1"])
    assert together.per_function["math_accuracy"] == [None, 1.0]
    assert [(e.index, e.kind) for e in together.errors] == [(None, "GoldAnswerWarning")]
    assert result.metrics()["reward/errors/GoldAnswerWarning"] == 1.0


def test_timeout_memory_and_warnings_are_counted(pool):
    pids = pool.worker_pids()
    start = time.monotonic()
    result = _score(pool, ["sleep", "hog", "warn", "alarm", "ok"], ["1"] * 5)
    elapsed = time.monotonic() - start
    assert result.per_function["user"] == [0.0, 0.0, 1.0, 0.0, 1.0]
    # slices of 3 and 2: the first timed out and was redone sample by sample, so its samples are named; the alarm
    # was reported by a call on two samples, which cannot say which one
    kinds = {(e.index, e.kind) for e in result.errors if e.function == "user"}
    assert kinds == {(0, "timeout"), (1, "memory"), (2, "OddSampleWarning"), (None, "timeout")}
    assert result.timeouts == 2 and result.retried == 1 and result.metrics()["reward/retried"] == 1.0
    assert elapsed < 2 * TIMEOUT_S + 1.5  # the slice's time limit, then the sleeping sample's own
    killed = set(pids) - set(pool.worker_pids())
    assert 1 <= len(killed) <= 2 and not any(psutil.pid_exists(p) for p in killed)


def test_grading_process_killed_while_idle_is_replaced():
    with RewardPool([f"{USER}:worker_pid"], SandboxConfig(workers=2, timeout_s=5.0)) as pool:
        served: set[float] = set()
        while not served >= set(pool.worker_pids()):  # until both workers are started and idle
            served |= set(pool.score(["p"] * 2, ["c"] * 2).total)
        killed = pool.worker_pids()
        for pid in killed:
            kill_and_wait(pid)
        result = pool.score(["p"] * 4, ["c"] * 4)
        assert result.errors == [] and set(result.total) <= set(pool.worker_pids())
    assert not any(psutil.pid_exists(p) for p in killed)


def test_reward_that_keeps_timing_out_is_skipped_for_the_step(caplog):
    rewards = [RewardSpec(f"{USER}:misbehave", name="user"), "format"]
    with RewardPool(rewards, SandboxConfig(workers=2, timeout_s=0.5), max_timeouts=2) as pool:
        pool.score(["p"] * 4, ["ok"] * 4)  # workers started
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sse_rl.rewards.pool"):
            result = pool.score(["p"] * 6, ["sleep"] * 6)
        elapsed = time.monotonic() - start
        again = pool.score(["p"] * 3, ["sleep", "ok", "ok"])
    assert result.per_function == {"user": [0.0] * 6, "format": [0.0] * 6}
    assert (result.timeouts, result.skipped) == (2, 4)
    assert [(e.index, e.kind) for e in result.errors if e.function == "user"] == \
        [(0, "timeout"), (1, "timeout")] + [(i, "skipped") for i in range(2, 6)]
    assert result.metrics()["reward/skipped"] == 4.0 and result.metrics()["reward/errors/skipped"] == 4.0
    assert elapsed < 0.5 + 1.5, f"took {elapsed:.2f} s: the skipped calls ran"
    assert "reward 'user' timed out on 2 samples" in caplog.text and "other 4 calls were skipped" in caplog.text
    assert again.per_function["user"] == [0.0, 1.0, 1.0] and (again.timeouts, again.skipped) == (1, 0)
    with pytest.raises(ValueError, match="max_timeouts must be >= 1"):
        RewardPool(["format"], max_timeouts=0)


def test_non_finite_values_pass_on_as_returned_unless_the_pool_scores_them_0_and_counts_them():
    rewards, completions = [RewardSpec(f"{USER}:misbehave", name="user")], ["nan", "ok", "nan"]
    with RewardPool(rewards, SandboxConfig(workers=1)) as pool:
        passed = pool.score(["p"] * 3, completions)
    with RewardPool(rewards, SandboxConfig(workers=1), zero_non_finite=True) as pool:
        zeroed = pool.score(["p"] * 3, completions)
    assert [math.isnan(v) for v in passed.per_function["user"]] == [True, False, True]  # the caller stops on these
    assert passed.non_finite == 0 and passed.errors == []
    assert zeroed.per_function["user"] == [0.0, 1.0, 0.0] and zeroed.total == [0.0, 1.0, 0.0]
    assert [(e.index, e.kind, e.message) for e in zeroed.errors] == [(0, "non_finite", "returned nan, scored 0"),
                                                                     (2, "non_finite", "returned nan, scored 0")]
    assert zeroed.non_finite == 2 and zeroed.metrics()["reward/non_finite"] == 2.0


def test_reward_bugs_raise_with_name_and_sample(pool):
    with pytest.raises(RewardFunctionError, match=r"(?s)reward 'user' raised on sample 1:.*KeyError.*difficulty"):
        _score(pool, ["ok", "raise"], ["1", "1"])
    with pytest.raises(RewardFunctionError, match="expected a float or None, got str"):
        _score(pool, ["junk"], ["1"])
    assert _score(pool, ["ok"], ["1"]).per_function["user"] == [1.0]  # the pool is still usable


def test_score_async_keeps_the_event_loop_free(pool):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        a, b = await asyncio.gather(
            pool.score_async(["p"], [r"\boxed{2}"], answer=["2"], completion_ids=[[0]]),
            pool.score_async(["p"], ["sleep"], answer=["2"], completion_ids=[[0]]),
        )
        tick_task.cancel()
        return a, b, ticks

    a, b, ticks = asyncio.run(main())
    assert a.per_function["math_accuracy"] == [1.0] and b.timeouts == 1
    assert ticks >= 50, f"event loop ticked only {ticks} times during a {TIMEOUT_S} s timeout"


def test_bad_inputs_fail_clearly(pool):
    with pytest.raises(ValueError, match="'answer' must be a list with one value per completion"):
        pool.score(["p", "p"], ["a", "b"], answer=["1"], completion_ids=[[0], [0]])
    with pytest.raises(ValueError, match="'prompts' must be a list"):
        pool.score("p", ["a"], answer=["1"], completion_ids=[[0]])
    with pytest.raises(RewardSpecError, match="unknown reward 'accuracy'"):
        RewardPool(["accuracy"])
    with pytest.raises(ValueError, match="cannot be pickled"):
        RewardPool([RewardSpec(lambda prompts, completions, **kw: [1.0] * len(completions), name="lam")])
    with pytest.raises(ValueError, match="names must be unique"):
        RewardPool(["format", RewardSpec(functools.partial(overlong, max_length=4, cache_length=2), name="format")])


def test_close_leaves_no_process():
    before = reward_children()
    pool = RewardPool([f"{USER}:misbehave"], SandboxConfig(workers=2, timeout_s=1.0))
    first = pool.worker_pids()
    result = pool.score(["p"] * 3, ["sleep", "ok", "ok"])
    assert result.timeouts == 1 and result.retried == 1
    pids = set(first) | set(pool.worker_pids())
    assert len(pids) == 4  # two killed: the slice [sleep, ok], then "sleep" alone
    pool.close()
    assert not any(psutil.pid_exists(p) for p in pids)
    assert reward_children() <= before
