"""The rollout/trainer mismatch, measured per micro-batch on the trainer's device (issue #28).

Choices:
1) Only tokens that carry loss weight count (weight > 0): overlong-filtered completions and fsdp2 fillers train
   nothing, so their mismatch changes nothing either.
2) The trainer side is pi_old, the logprob the importance ratio compares with the engine's (`PolicyLoss`).
3) |delta logprob| goes into a histogram of fixed log-spaced bins (16 per decade, 1e-8 to 100), which ranks and
   micro-batches sum, so the p99 of a step is read from one merged histogram: the upper edge of the bin that holds
   it, within a factor 10^(1/16) = 1.155 of the exact quantile.
4) Position in the response (token 0 = the first generated) in buckets 0-63, 64-255, 256-1023, 1024+: a mismatch
   that compounds through the recurrent state grows with position.
5) Sequence-level KL(rollout || trainer) estimates, mean over sequences of the sum over their tokens of k1 =
   log(rollout / trainer) and of k3 = r - 1 - log r (r = trainer / rollout; >= 0 per token). Their sums over
   sequences are sums over tokens, so only the sequence count is kept besides.
6) Route flips: the share of (token, SSE layer) pairs the engine recorded whose top-K partition set differs from
   the set the trainer's forward used (compared as sets: sorted along K). With routing replay the trainer uses the
   engine's sets, so the rate is 0 by construction.
Everything stays on the device (no read inside the micro-batch loop): bucket indices are comparisons, the histogram
edges are made on the device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sse_rl.models.layers import NO_ROUTE  # a position the engine computed no forward for

POSITION_BUCKETS = (0, 64, 256, 1024)  # first response position of each bucket
BUCKET_NAMES = ("pos_0_63", "pos_64_255", "pos_256_1023", "pos_1024_plus")
HIST_DECADES = (-8, 2)  # |delta| histogram from 1e-8 to 1e2
HIST_PER_DECADE = 16


def histogram_edges(device: torch.device | str = "cpu") -> Tensor:
    """Upper edges of the |delta| histogram's bins [E]; bin i holds (edges[i-1], edges[i]], bin E everything above."""
    lo, hi = HIST_DECADES
    return torch.logspace(lo, hi, (hi - lo) * HIST_PER_DECADE + 1, device=device)  # [E]


def position_bucket(response_pos: Tensor) -> Tensor:
    """Bucket index [N] of each position in its response (choice 4), by comparisons (no host-made tensor)."""
    return sum((response_pos >= start).long() for start in POSITION_BUCKETS[1:])  # [N]


def logprob_stats(trainer_logp: Tensor, rollout_logp: Tensor, weights: Tensor, seq_ids: Tensor,
                  response_pos: Tensor) -> dict[str, Tensor]:
    """The logprob-mismatch fields of `StepStats` for one micro-batch, from per-token tensors [N] (module doc)."""
    mask = (weights > 0).float()  # [N] choice 1
    delta = (rollout_logp - trainer_logp.detach()).float()  # [N] log(rollout / trainer)
    absd = delta.abs()  # [N]
    edges = histogram_edges(absd.device)  # [E]
    hist = absd.new_zeros(edges.numel() + 1).index_add_(0, torch.bucketize(absd, edges), mask)  # [E+1]
    bucket = position_bucket(response_pos)  # [N]
    pos_sum = absd.new_zeros(len(POSITION_BUCKETS)).index_add_(0, bucket, absd * mask)  # [4]
    pos_tokens = absd.new_zeros(len(POSITION_BUCKETS)).index_add_(0, bucket, mask)  # [4]
    seqs = (absd.new_zeros(seq_ids.numel()).index_add_(0, seq_ids, mask) > 0).sum().float()
    k3 = torch.exp(-delta) - 1.0 + delta  # [N]
    return {"mismatch_hist": hist, "mismatch_pos_sum": pos_sum, "mismatch_pos_tokens": pos_tokens,
            "mismatch_sequences": seqs, "seq_kl_k1_sum": (delta * mask).sum(), "seq_kl_k3_sum": (k3 * mask).sum()}


def route_stats(engine_routes: Tensor, trainer_routes: Tensor) -> dict[str, Tensor]:
    """The route-flip fields of `StepStats`: recorded (token, SSE layer) pairs and those whose partition sets differ
    (choice 6), from [..., S, K] integer routes of the same layout (NO_ROUTE where the engine recorded none)."""
    recorded = (engine_routes != NO_ROUTE).all(-1)  # [..., S]
    engine_set = engine_routes.long().sort(-1).values
    trainer_set = trainer_routes.long().sort(-1).values
    differ = (engine_set != trainer_set).any(-1)  # [..., S]
    return {"route_pairs": recorded.sum().float(), "route_flips": (differ & recorded).sum().float()}


def quantile(hist: Tensor, q: float) -> float:
    """The upper edge of the histogram bin that holds quantile q of what `histogram_edges` binned (inf past the
    last edge, nan for an empty histogram)."""
    cum = hist.double().cumsum(0)  # [E+1]
    if float(cum[-1]) <= 0:
        return math.nan
    i = int(torch.searchsorted(cum, q * cum[-1]))
    edges = histogram_edges()
    return float(edges[i]) if i < edges.numel() else math.inf
