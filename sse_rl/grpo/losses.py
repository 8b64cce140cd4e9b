"""The GRPO policy loss on flat per-token tensors, plus the aggregation weights that turn it into one scalar.

Choices:
1) PPO clip with clip-higher: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A), r = pi / pi_old per token.
2) Truncated importance sampling (TIS) corrects the engine/trainer mismatch: the policy-gradient term is weighted by
   min(pi_old / pi_rollout, C), per token ("token_truncate") or per sequence ("sequence_truncate"), or not at all.
3) Optional k3 KL to a frozen reference, exp(ref - logp) - (ref - logp) - 1, added per token with `kl_coef`. The
   samples come from pi_old, not pi, so the estimate of KL(pi || ref) is biased once pi moves; `kl_bias_correction`
   weights it by pi / pi_old per token (TRL's `use_bias_correction_kl`). Off by default, as in TRL: the bias is
   small while pi stays near pi_old, which the clip keeps it.
4) Aggregation is a weight per token, computed once per mini-batch from the sequence lengths: "dapo" = 1 / (all
   tokens), "grpo" = 1 / (len_seq * n_seqs), "dr_grpo" = 1 / (max_tokens * n_seqs). The loss is sum(w * l), so it is
   the same however the mini-batch is cut into micro-batches or spread over ranks (gradients are summed).
5) The statistics (clip fractions, importance weights, mismatch, KL) count only the tokens that carry loss weight:
   a filtered completion (overlong, zero-advantage weight) trains nothing and so says nothing about the update.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sse_rl.step_stats import StepStats


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float,
                  eps_high: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token clipped surrogate; returns (loss [N], clipped-low [N] bool, clipped-high [N] bool)."""
    ratio = torch.exp(logp - old_logp)  # [N]
    unclipped = ratio * advantages  # [N]
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages  # [N]
    loss = -torch.minimum(unclipped, clipped)  # [N]
    low = (ratio < 1.0 - eps_low) & (advantages < 0)  # [N] gradient cut at the lower bound
    high = (ratio > 1.0 + eps_high) & (advantages > 0)  # [N] gradient cut at the upper bound
    return loss, low, high


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): unbiased, always >= 0."""
    delta = ref_logp - logp  # [N]
    return torch.exp(delta) - delta - 1.0  # [N]


def _token_truncate(log_ratio: Tensor, seq_ids: Tensor, cap: float) -> Tensor:
    return torch.exp(log_ratio).clamp(max=cap)  # [N]


def _sequence_truncate(log_ratio: Tensor, seq_ids: Tensor, cap: float) -> Tensor:
    # one slot per token bounds the sequence count without reading seq_ids.max() (a read waits for the GPU)
    per_seq = log_ratio.new_zeros(seq_ids.numel()).index_add_(0, seq_ids, log_ratio)  # [N] log of each seq's ratio
    return torch.exp(per_seq).clamp(max=cap)[seq_ids]  # [N]


def _no_correction(log_ratio: Tensor, seq_ids: Tensor, cap: float) -> Tensor:
    return torch.ones_like(log_ratio)  # [N]


# name -> fn(log(pi_old / pi_rollout) [N], seq_ids [N], cap) -> IS weight [N]
IS_CORRECTIONS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "token_truncate": _token_truncate, "sequence_truncate": _sequence_truncate, "none": _no_correction,
}


def _dapo(lengths: Tensor, max_tokens: int) -> Tensor:
    return torch.full_like(lengths, 1.0 / max(float(lengths.sum()), 1.0))  # [S]


def _grpo(lengths: Tensor, max_tokens: int) -> Tensor:
    return 1.0 / (lengths.clamp(min=1) * lengths.numel())  # [S]


def _dr_grpo(lengths: Tensor, max_tokens: int) -> Tensor:
    return torch.full_like(lengths, 1.0 / (max_tokens * lengths.numel()))  # [S]


# name -> fn(active tokens per sequence [S] float, max_tokens) -> weight of each of that sequence's tokens [S]
LOSS_AGGS: dict[str, Callable[[Tensor, int], Tensor]] = {"dapo": _dapo, "grpo": _grpo, "dr_grpo": _dr_grpo}


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(registry)}")
    return registry[name]


def build_loss_agg(name: str, max_tokens: int) -> Callable[[Tensor], Tensor]:
    """Select the aggregation once: returns fn(active tokens per sequence [S]) -> per-sequence token weight [S]."""
    agg = _lookup(LOSS_AGGS, name, "loss aggregation")
    return lambda lengths: agg(lengths.float(), max_tokens)


@dataclass
class LossInputs:
    """One micro-batch, flattened to its completion tokens (N of them)."""

    logp: Tensor  # [N] trainer logprobs of the sampled tokens, with grad
    old_logp: Tensor  # [N] pi_old: trainer logprobs before this batch's updates
    rollout_logp: Tensor  # [N] engine logprobs at sampling time
    advantages: Tensor  # [N]
    weights: Tensor  # [N] aggregation weight; 0 on filtered tokens
    seq_ids: Tensor  # [N] int64 sequence index within the micro-batch
    ref_logp: Tensor | None = None  # [N] reference logprobs, when kl_coef > 0


class PolicyLoss:
    """The per-micro-batch loss; variants are selected here, once, at build time."""

    def __init__(self, *, eps_low: float, eps_high: float, kl_coef: float, is_correction: str, is_cap: float,
                 kl_bias_correction: bool):
        self.eps_low, self.eps_high, self.kl_coef, self.is_cap = eps_low, eps_high, kl_coef, is_cap
        self.kl_bias_correction = kl_bias_correction
        self.is_weights = _lookup(IS_CORRECTIONS, is_correction, "IS correction")

    def __call__(self, x: LossInputs) -> tuple[Tensor, StepStats]:
        """Returns (sum of weighted token losses, this micro-batch's loss statistics as detached fp32 0-d tensors).
        The statistics stay on the device: reading one waits for the GPU, so the trainer reads them once per step."""
        pg, low, high = ppo_clip_loss(x.logp, x.old_logp, x.advantages, self.eps_low, self.eps_high)
        log_ratio = (x.old_logp - x.rollout_logp).detach()  # [N]
        is_w = self.is_weights(log_ratio, x.seq_ids, self.is_cap)  # [N]
        per_token = pg * is_w  # [N]
        kl = k3_kl(x.logp, x.ref_logp) if self.kl_coef > 0 else None  # [N]
        if kl is not None and self.kl_bias_correction:  # choice 3: TRL's use_bias_correction_kl
            kl = kl * torch.exp(x.logp - x.old_logp)
        if kl is not None:
            per_token = per_token + self.kl_coef * kl
        loss = (per_token * x.weights).sum()
        # statistics count the tokens that carry loss weight (all of them where none does: sync-free)
        counted = (x.weights > 0) | ~(x.weights > 0).any()  # [N] bool
        stats = StepStats(tokens=_stat(counted.sum()), loss=_stat(loss),
                          clip_low=_stat((low & counted).sum()), clip_high=_stat((high & counted).sum()),
                          is_sum=_stat((is_w * counted).sum()),
                          is_max=_stat(torch.where(counted, is_w, -torch.inf).max()),
                          is_min=_stat(torch.where(counted, is_w, torch.inf).min()))
        if kl is not None:
            stats.kl_sum = _stat((kl * counted).sum())
        return loss, stats


def _stat(value: Tensor) -> Tensor:
    """A statistic as the trainer sums it: detached fp32, still on the device."""
    return value.detach().float()
