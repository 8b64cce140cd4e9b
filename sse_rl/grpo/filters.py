"""Which groups and completions take part in the loss.

Choices:
1) Dynamic sampling (DAPO) keeps a group only if its accuracy varies: an all-right or all-wrong group has zero
   advantage everywhere and would only dilute the batch. It filters on the raw accuracy function, not on the shaped
   total, so a length penalty alone cannot make a group look informative.
2) Overlong filtering (DAPO) gives truncated completions (finish reason "length") zero loss weight, so the policy is
   not punished for an answer it was not allowed to finish.
"""
from __future__ import annotations

import torch
from torch import Tensor


def group_has_variance(values: Tensor) -> Tensor:
    """[P, G] -> [P] bool: True where the group's values are not all equal (NaN, an unscored completion, aside)."""
    high = values.nan_to_num(nan=-torch.inf).max(dim=1).values  # [P]
    low = values.nan_to_num(nan=torch.inf).min(dim=1).values  # [P]
    return high > low


def loss_keep_mask(finish_reasons: list[str], overlong_filter: bool) -> Tensor:
    """[B] bool: False for completions that get no loss (truncated ones, when overlong filtering is on)."""
    keep = [not (overlong_filter and reason == "length") for reason in finish_reasons]
    return torch.tensor(keep, dtype=torch.bool)  # [B]
