"""Rewards called as TRL 1.16 calls them: TRL's own reward functions (`trl.rewards`) and rewards written the way its
documentation writes them, unchanged, graded by the pool and compared with what TRL's own call gives.

The oracle is TRL's `GRPOTrainer._calculate_rewards` itself, run on a stand-in trainer that holds only what that
method reads (device, state, reward functions and names, the log_extra / log_metric buffers, the async loop), on
each grading worker's share of the batch, as TRL runs it on each process's share under data parallelism.
"""
import collections
import math
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from sse_rl.config import RecipeError
from sse_rl.config.checks import parse_recipe, validate
from sse_rl.rewards import RewardFunctionError, RewardPool, RewardSpec, SandboxConfig, TrainerState, probe
from sse_rl.rollouts import Round, logged_metrics
from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

HERE = Path(__file__).parent
DOC = HERE / "trl_doc_rewards.py"
USER = HERE / "user_rewards.py"
ROOT = HERE.parents[1]
WORKERS = 2
STEP = 7
COMPLETIONS = ["<think>a</think> so \\boxed{1}", "yes", "no no no no no no", "yes \\boxed{2}",
               "x" * 20, "<think>long thought</think>\\boxed{1}"]


def trl_rewards(funcs: list, inputs: list[dict], completions: list, completion_ids: list[list[int]],
                global_step: int) -> tuple[list[list[float]], dict, dict]:
    """TRL's `_calculate_rewards` on one batch: ([N][F] rewards, None as NaN), its log_metric and log_extra buffers."""
    from transformers import TrainerState as HFTrainerState
    from trl import GRPOTrainer
    from trl.trainer.utils import start_event_loop_in_daemon

    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
        args=types.SimpleNamespace(report_to=[]), state=HFTrainerState(global_step=global_step),
        reward_funcs=funcs, reward_processing_classes=[None] * len(funcs),
        reward_func_names=[f.__name__ for f in funcs], environments=None,
        _pending_extra_logs=collections.defaultdict(list), _pending_metrics=collections.defaultdict(list))
    trainer._log_completion_extra = types.MethodType(GRPOTrainer._log_completion_extra, trainer)
    trainer._log_metric = types.MethodType(GRPOTrainer._log_metric, trainer)
    _, trainer.async_loop, ready = start_event_loop_in_daemon()
    ready.wait()
    prompts = [row["prompt"] for row in inputs]
    rewards = GRPOTrainer._calculate_rewards(trainer, inputs, prompts, completions, completion_ids)
    trainer.async_loop.call_soon_threadsafe(trainer.async_loop.stop)
    return rewards.tolist(), dict(trainer._pending_metrics), dict(trainer._pending_extra_logs)


def trl_per_share(funcs: list, inputs: list[dict], completions: list, ids: list[list[int]]) -> tuple:
    """`trl_rewards` on each worker's share (the pool's contiguous slices), joined: values per function, logged
    metrics, extra columns."""
    size = math.ceil(len(completions) / WORKERS)
    values: list[list[float]] = []
    metrics: dict[str, list] = collections.defaultdict(list)
    extra: dict[str, list] = collections.defaultdict(list)
    for start in range(0, len(completions), size):
        share = slice(start, start + size)
        v, m, e = trl_rewards(funcs, inputs[share], completions[share], ids[share], STEP)
        values += v
        for name, logged in m.items():
            metrics[name] += logged
        for column, logged in e.items():
            extra[column] += logged
    return {f.__name__: [row[i] for row in values] for i, f in enumerate(funcs)}, dict(metrics), dict(extra)


def doc_reward(name: str):
    """A reward of trl_doc_rewards.py, loaded as the pool loads it (by file path)."""
    return RewardSpec(f"{DOC}:{name}").build()


def as_nan(values: list) -> list[float]:
    return [math.nan if v is None else v for v in values]


def assert_same(ours: dict[str, list], trl: dict[str, list]) -> None:
    assert set(ours) == set(trl)
    for name in trl:
        assert as_nan(ours[name]) == pytest.approx(trl[name], nan_ok=True), name


@pytest.fixture(scope="module")
def inputs() -> list[dict]:
    return [{"prompt": f"question {i}", "ground_truth": "1", "task": ["math", "chat"][i % 2]}
            for i in range(len(COMPLETIONS))]


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    return [[7] * (4 * i) + [1, 2, 3] * i for i in range(len(COMPLETIONS))]


def test_standard_data_rewards_get_what_trl_gives(inputs, ids):
    """Documented forms (a quickstart reward, a dataset column, trainer_state, None for another task, log_metric /
    log_extra, async) and TRL's callable-class rewards, one call per worker's share."""
    names = ["reward_len", "reward_func", "length_penalty_by_step", "math_only", "logging_reward", "async_reward"]
    overlong = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=8)
    repetition = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    specs = [RewardSpec(f"{DOC}:{n}") for n in names] + [RewardSpec(overlong), RewardSpec(repetition)]
    columns = {key: [row[key] for row in inputs] for key in ("prompt", "ground_truth", "task")}
    with RewardPool(specs, SandboxConfig(workers=WORKERS)) as pool:
        result = pool.score(columns["prompt"], COMPLETIONS, trainer_state=TrainerState(global_step=STEP),
                            completion_ids=ids, **columns)
    funcs = [doc_reward(n) for n in names] + [overlong, repetition]
    values, metrics, extra = trl_per_share(funcs, inputs, COMPLETIONS, ids)
    assert_same(result.per_function, values)
    assert result.logged == metrics and set(metrics) == {"mean_length"}
    assert result.extra == extra and result.extra["length"] == [len(c) for c in COMPLETIONS]
    assert result.metrics()["reward/mean_length"] == pytest.approx(sum(metrics["mean_length"]) / WORKERS)
    assert result.per_function["length_penalty_by_step"][0] != 0.0  # the step reached the reward
    assert result.errors == [] and result.retried == 0


def test_conversational_data_rewards_get_what_trl_gives():
    """Prompts as chat messages: completions reach the rewards as one assistant message each, as in TRL; TRL's
    think_format_reward and accuracy_reward (with its log_extra columns) and the documented format reward."""
    from trl.rewards import accuracy_reward, think_format_reward

    texts = ["<think>\nhmm\n</think>\nSo \\boxed{\\frac{1}{3}}", "no think \\boxed{\\frac{1}{2}}",
             "<think>x</think><answer>4</answer>", "<think>a</think> \\boxed{0.5}"]
    solutions = ["\\frac{1}{3}", "\\frac{1}{3}", "4", "\\frac{1}{2}"]
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(len(texts))]
    inputs = [{"prompt": p, "solution": s} for p, s in zip(prompts, solutions)]
    ids = [[1] * len(t) for t in texts]
    specs = ["trl.rewards.format_rewards:think_format_reward", "trl.rewards.accuracy_rewards:accuracy_reward",
             f"{DOC}:format_reward_func"]
    with RewardPool(specs, SandboxConfig(workers=WORKERS)) as pool:
        result = pool.score(prompts, texts, trainer_state=TrainerState(global_step=STEP), completion_ids=ids,
                            prompt=prompts, solution=solutions)
    as_messages = [[{"role": "assistant", "content": t}] for t in texts]
    values, metrics, extra = trl_per_share([think_format_reward, accuracy_reward, doc_reward("format_reward_func")],
                                           inputs, as_messages, ids)
    assert_same(result.per_function, values)
    assert result.per_function["accuracy_reward"] == [1.0, 0.0, 0.0, 1.0]  # math-verify wants a box, not <answer>
    assert result.per_function["format_reward_func"] == [0.0, 0.0, 1.0, 0.0]
    assert result.extra == extra and set(extra) == {"solution", "gold_parsed", "answer_parsed"}
    assert result.logged == metrics == {}


def test_quickstart_reward_runs_unchanged_from_the_readme(tmp_path):
    """The README's "Write your own reward" code, run as written: TRL's quickstart reward in the pool."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Write your own reward", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    files = re.split(r"^# (\S+\.py)\n", code, flags=re.M)[1:]
    for name, text in zip(files[::2], files[1::2]):
        (tmp_path / name).write_text(text)
    printed = re.search(r"print\(.*\)\s*# (.*)", code).group(1)
    proc = subprocess.run([sys.executable, "train_rewards.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == printed.strip()


def test_a_slice_that_times_out_is_redone_sample_by_sample():
    """One hanging sample costs its own score, not its slice's: the others keep their values, the hang is counted."""
    with RewardPool([RewardSpec(f"{USER}:misbehave", name="user"), f"{DOC}:reward_len"],
                    SandboxConfig(workers=1, timeout_s=1.0)) as pool:
        start = time.monotonic()
        result = pool.score(["p"] * 4, ["ok", "sleep", "ok", "ok"])
        elapsed = time.monotonic() - start
    assert result.per_function == {"user": [1.0, 0.0, 1.0, 1.0], "reward_len": [-18.0, -15.0, -18.0, -18.0]}
    assert (result.timeouts, result.retried) == (1, 1)
    assert [(e.function, e.index, e.kind) for e in result.errors] == [("user", 1, "timeout")]
    assert elapsed < 2 * 1.0 + 1.5, f"{elapsed:.2f} s: the slice's limit, then the hanging sample's own"


def test_a_sample_that_raises_is_named_after_its_slice_fails():
    with RewardPool([RewardSpec(f"{USER}:misbehave", name="user")], SandboxConfig(workers=1)) as pool:
        with pytest.raises(RewardFunctionError, match=r"(?s)reward 'user' raised on sample 2:.*KeyError"):
            pool.score(["p"] * 3, ["ok", "ok", "raise"])


def test_logged_metrics_reach_the_step_metrics_as_their_mean():
    rounds = [Round([], 0.0, 0.0, 0, 0, logged={"mean_length": [4.0, 6.0], "judge/calls": [1.0]}),
              Round([], 0.0, 0.0, 0, 0, logged={"mean_length": [8.0]})]
    assert logged_metrics(rounds) == {"reward/judge/calls": 1.0, "reward/mean_length": 6.0}


def test_probe_calls_a_reward_as_the_pool_does():
    row = {"answer": "0", "ground_truth": "0"}
    assert probe(RewardSpec(f"{DOC}:reward_func"), "q", row, 5.0).values == [1.0]
    chat = probe(RewardSpec("trl.rewards.format_rewards:think_format_reward"), [{"role": "user", "content": "q"}],
                 row, 5.0)
    assert chat.values == [1.0]
    with pytest.raises(RewardFunctionError, match="unexpected keyword argument 'prompts'"):
        probe(RewardSpec(f"{DOC}:reward_positional"), "q", row, 5.0)
    with pytest.raises(TimeoutError, match="did not return within 0.2 s"):
        probe(RewardSpec(f"{USER}:nap"), "q", row, 0.2)


def test_recipe_check_names_a_reward_that_does_not_take_trls_call(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"problem": "max(1,2,3)=", "answer": "3"}\n')
    rewards = (f"reward.functions=[{{spec: {DOC}:reward_len}}, {{spec: {DOC}:reward_positional}}, "
               f"{{spec: {DOC}:reward_func}}]")
    recipe, errors = parse_recipe(ROOT / "recipes" / "tiny_cpu.yaml", [f"out_dir={tmp_path / 'run'}",
                                                                       f"data.train={data}", "data.eval=", rewards])
    start = time.monotonic()
    with pytest.raises(RecipeError) as caught:
        validate(recipe, errors)
    elapsed = time.monotonic() - start
    message = str(caught.value)
    assert "reward.functions.1: reward 'reward_positional' fails on the probe row" in message
    assert "unexpected keyword argument 'prompts'" in message
    assert "reward.functions.2: reward 'reward_func'" in message and "'ground_truth'" in message
    assert "reward.functions.0" not in message
    assert elapsed < 30, f"validate took {elapsed:.1f} s"
