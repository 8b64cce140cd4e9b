"""Rewards written the way TRL's GRPOTrainer documentation writes them, unchanged in form (loaded by file path in
tests/rewards/test_trl_calls.py, so they reach the grading processes as a user's file would)."""
import asyncio
import re


def reward_len(completions, **kwargs):
    """TRL's quickstart reward."""
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format (TRL docs, conversational data)."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    """Reward function that checks if the completion is the same as the ground truth (TRL docs: a dataset column)."""
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


def length_penalty_by_step(completions, trainer_state, **kwargs):
    """A penalty that grows with training progress, from `trainer_state` (TRL docs: the trainer's state)."""
    scale = trainer_state.global_step / 100
    return [-scale * len(completion) / 100 for completion in completions]


def math_only(completions, task, **kwargs):
    """Multi-task data: None where the reward does not apply (TRL docs)."""
    return [float(len(c) % 2) if t == "math" else None for c, t in zip(completions, task)]


def logging_reward(completions, log_metric=None, log_extra=None, **kwargs):
    """Logs a scalar and a column the way TRL's reward functions do (`log_metric`, `log_extra`)."""
    lengths = [len(completion) for completion in completions]
    if log_metric is not None:
        log_metric("mean_length", sum(lengths) / len(lengths))
    if log_extra is not None:
        log_extra("length", lengths)
    return [1.0] * len(completions)


async def async_reward(completions, **kwargs):
    """An asynchronous reward (TRL docs: e.g. one that calls a remote judge), awaited by the trainer."""
    await asyncio.sleep(0.01)
    return [float("yes" in completion) for completion in completions]


def reward_positional(prompts_list, completions_list):
    """Not a TRL reward: positional names TRL's call does not give. The probe must name it."""
    return [0.0] * len(completions_list)
