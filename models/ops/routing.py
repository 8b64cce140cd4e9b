"""Token routing of the SSE "varlen" form (spec §1.6a) without host synchronisation.

Each token is written to K sparse partitions. The (token, partition) pairs are put in (sequence, partition, time)
order by a stable counting sort per sequence (spec §3.3.2): a prefix count of the partition hits along the packed
tokens gives every pair its rank inside its (sequence, partition) segment, and an exclusive scan of the segment
sizes gives the segment offsets. Everything stays on the device with static shapes (no `.item()`, no `unique`,
empty segments kept), so prefill can be CUDA-graph captured.

The sorted pairs follow the L shared-stream rows in one stream of L * (1 + K) rows, whose segments are indexed like
the state: segment `s * (N + 1) + j` is sequence s, partition j (0 = shared, 1 + i = sparse partition i).
Moving rows between token order and segment order is a gather both ways (the backward of one is the other), so
nothing uses atomics and the results are deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Where every (token, partition) pair goes; all tensors live on the device of the router indices."""

    perm: torch.Tensor       # [L*K] int64: sorted sparse row -> pair id (token * K + r)
    inv: torch.Tensor        # [L*K] int64: pair id -> sorted sparse row
    seg_start: torch.Tensor  # [S*(N+1)] int32: first stream row of segment (s, j)
    seg_len: torch.Tensor    # [S*(N+1)] int32: rows of segment (s, j), 0 allowed
    top_k: int


def sort_by_partition(indices: torch.Tensor, cu_seqlens: torch.Tensor, num_partitions: int) -> Routing:
    """Stable counting sort of the pairs `indices [L, K]` (partition ids, distinct per token) by (sequence,
    partition), for packed sequences `cu_seqlens [S+1]` (cu_seqlens[-1] == L)."""
    L, K = indices.shape
    N, S = num_partitions, cu_seqlens.numel() - 1
    dev = indices.device
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    tok = torch.arange(L, device=dev)
    seq = torch.searchsorted(cu[1:], tok, right=True)                              # [L]
    hits = torch.zeros(L, N, dtype=torch.int64, device=dev).scatter_(1, indices, 1)  # [L, N]
    before = torch.cat([hits.new_zeros(1, N), hits.cumsum(0)])                    # [L+1, N] hits before row t
    first = before[cu[:-1]]                                                       # [S, N]
    counts = before[cu[1:]] - first                                               # [S, N]
    offsets = counts.flatten().cumsum(0) - counts.flatten()                       # [S*N] exclusive scan
    rank = before[tok[:, None], indices] - first[seq[:, None], indices]           # [L, K]
    inv = (offsets[seq[:, None] * N + indices] + rank).flatten()                  # [L*K]
    perm = torch.empty_like(inv).scatter_(0, inv, torch.arange(L * K, device=dev))
    seg_start = torch.cat([cu[:-1, None], L + offsets.view(S, N)], dim=1)         # [S, N+1]
    seg_len = torch.cat([(cu[1:] - cu[:-1])[:, None], counts], dim=1)             # [S, N+1]
    return Routing(perm, inv, seg_start.flatten().int(), seg_len.flatten().int(), K)


def gather_pairs(x: torch.Tensor, routing: Routing, per_token: bool) -> torch.Tensor:
    """Rows of `x` in sorted pair order: x [L, ...] per token (repeated for its K pairs) or [L*K, ...] per pair."""
    return PairsToSegments.apply(x, routing.perm, routing.inv, routing.top_k if per_token else 1)


def scatter_pairs(x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Sorted pair rows `x [L*K, ...]` back to token order, summed over each token's K pairs -> [L, ...]."""
    return SegmentsToTokens.apply(x, routing.perm, routing.inv, routing.top_k)


def _gather(x: torch.Tensor, perm: torch.Tensor, fold: int) -> torch.Tensor:
    return x[perm // fold] if fold > 1 else x[perm]


def _combine(x: torch.Tensor, inv: torch.Tensor, fold: int) -> torch.Tensor:
    return x[inv].view(-1, fold, *x.shape[1:]).sum(1)


class PairsToSegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv, fold: int):
        ctx.save_for_backward(perm, inv)
        ctx.fold = fold
        return _gather(x, perm, fold)

    @staticmethod
    def backward(ctx, dy):
        _, inv = ctx.saved_tensors
        return _combine(dy, inv, ctx.fold), None, None, None


class SegmentsToTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv, fold: int):
        ctx.save_for_backward(perm, inv)
        ctx.fold = fold
        return _combine(x, inv, fold)

    @staticmethod
    def backward(ctx, dy):
        perm, _ = ctx.saved_tensors
        return _gather(dy, perm, ctx.fold), None, None, None
