"""Group-relative advantages: one scalar per completion, shared by all of its tokens.

Choices:
1) The baseline is the group mean (the G completions of one prompt).
2) The scale is switchable (`algo.adv_std_scaling`): "group" divides by the group's std (GRPO), "batch" by the
   std of all rewards in the batch (Lite-PPO), "none" keeps r - mean (Dr. GRPO).
3) Stds are unbiased (torch default) plus EPS, so a zero-variance group has advantage exactly 0.
4) A completion no reward function scored (every function returned None) has reward NaN: it stays out of its
   group's mean and std and its advantage is 0, as in TRL, so it neither moves the baseline nor the policy.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

EPS = 1e-4


def nan_std(values: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased std over the non-NaN values (NaN where fewer than 2)."""
    squares = (values - values.nanmean(dim=dim, keepdim=True)) ** 2
    count = (~values.isnan()).sum(dim=dim, keepdim=keepdim)
    return (squares.nansum(dim=dim, keepdim=keepdim) / (count - 1)).sqrt()


def _group_std(rewards: Tensor) -> Tensor:
    return nan_std(rewards, dim=1, keepdim=True) + EPS  # [P, 1]


def _batch_std(rewards: Tensor) -> Tensor:
    return nan_std(rewards).expand(rewards.shape[0], 1) + EPS  # [P, 1]


def _no_std(rewards: Tensor) -> Tensor:
    return rewards.new_ones(rewards.shape[0], 1)  # [P, 1]


# name -> the denominator of (r - group mean), shape [P, 1]
STD_SCALINGS: dict[str, Callable[[Tensor], Tensor]] = {"group": _group_std, "batch": _batch_std, "none": _no_std}


def build_advantage_fn(std_scaling: str) -> Callable[[Tensor], Tensor]:
    """Select the std scaling once; the returned function maps rewards [P, G] -> advantages [P, G]."""
    if std_scaling not in STD_SCALINGS:
        raise ValueError(f"unknown std scaling {std_scaling!r}; choose from {', '.join(STD_SCALINGS)}")
    scale_fn = STD_SCALINGS[std_scaling]

    def advantages(rewards: Tensor) -> Tensor:
        if rewards.dim() != 2 or rewards.shape[1] < 2:
            raise ValueError(f"rewards must be [prompts, G] with G >= 2, got shape {tuple(rewards.shape)}")
        rewards = rewards.float()
        centered = rewards - rewards.nanmean(dim=1, keepdim=True)  # [P, G]
        return (centered / scale_fn(rewards)).nan_to_num(nan=0.0)  # [P, G]; choice 4

    return advantages

