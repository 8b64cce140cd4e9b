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
    src: torch.Tensor        # [L*K] int64: sorted sparse row -> its token (perm // K)
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
    seq = torch.searchsorted(cu[1:], tok, right=True)                                 # [L]
    # Partition-major [N, L] so the prefix count is an inner-dim scan (an outer-dim scan over L rows is slow).
    hits = torch.zeros(N, L, dtype=torch.int32, device=dev).scatter_(0, indices.T, 1)   # [N, L]
    before = torch.cat([hits.new_zeros(N, 1), hits.cumsum(1, dtype=torch.int32)], 1)   # [N, L+1] hits before t
    first = before[:, cu[:-1]].T.long()                                              # [S, N]
    counts = before[:, cu[1:]].T.long() - first                                      # [S, N]
    offsets = counts.flatten().cumsum(0) - counts.flatten()                          # [S*N] exclusive scan
    rank = before[indices, tok[:, None]].long() - first[seq[:, None], indices]       # [L, K]
    inv = (offsets[seq[:, None] * N + indices] + rank).flatten()                     # [L*K]
    perm = torch.empty_like(inv).scatter_(0, inv, torch.arange(L * K, device=dev))
    seg_start = torch.cat([cu[:-1, None], L + offsets.view(S, N)], dim=1)            # [S, N+1]
    seg_len = torch.cat([(cu[1:] - cu[:-1])[:, None], counts], dim=1)                # [S, N+1]
    return Routing(perm, perm // K, inv, seg_start.flatten().int(), seg_len.flatten().int(), K)


def to_stream(shared: torch.Tensor, sparse: torch.Tensor, routing: Routing,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """The stream [shared rows | each token's sparse row once per routed pair, in segment order], the sparse rows
    multiplied by their pair's weight when `weights [L, K]` is given: [L, ...] x2 -> [L * (1 + K), ...]."""
    return ToStream.apply(shared, sparse, weights, routing.perm, routing.src, routing.inv, routing.top_k)


def from_stream(stream: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Token-order sum of a stream [L * (1 + K), ...]: the shared row plus the token's K sparse rows -> [L, ...]."""
    return FromStream.apply(stream, routing.src, routing.inv, routing.top_k)


def pairs_to_tokens(x: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sorted pair rows [L*K, ...] -> [L, ...] summed over each token's K pairs (a gather, no atomics)."""
    x = x[inv]
    return x if top_k == 1 else x.view(-1, top_k, *x.shape[1:]).sum(1)


class ToStream(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shared, sparse, weights, perm, src, inv, top_k: int):
        L = shared.shape[0]
        out = shared.new_empty(L * (1 + top_k), *shared.shape[1:])
        out[:L] = shared
        torch.index_select(sparse, 0, src, out=out[L:])
        w = weights.reshape(-1)[perm] if weights is not None else None                # [L*K] fp32
        if w is not None:
            out[L:] *= w.view(-1, *[1] * (sparse.ndim - 1)).to(out.dtype)
        ctx.save_for_backward(sparse, w, src, inv)
        ctx.top_k = top_k
        return out

    @staticmethod
    def backward(ctx, dout):
        sparse, w, src, inv = ctx.saved_tensors
        L = sparse.shape[0]
        dsorted, dw = dout[L:], None
        if w is not None:
            wb = w.view(-1, *[1] * (sparse.ndim - 1))
            dw = (dsorted.float() * sparse[src].float()).flatten(1).sum(1)[inv].view(L, ctx.top_k)   # [L, K]
            dsorted = dsorted * wb.to(dsorted.dtype)
        return dout[:L], pairs_to_tokens(dsorted, inv, ctx.top_k), dw, None, None, None, None


class FromStream(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, src, inv, top_k: int):
        L = stream.shape[0] // (1 + top_k)
        ctx.save_for_backward(src)
        ctx.top_k = top_k
        return stream[:L] + pairs_to_tokens(stream[L:], inv, top_k)

    @staticmethod
    def backward(ctx, dy):
        (src,) = ctx.saved_tensors
        L = dy.shape[0]
        dstream = dy.new_empty(L * (1 + ctx.top_k), *dy.shape[1:])
        dstream[:L] = dy
        torch.index_select(dy, 0, src, out=dstream[L:])
        return dstream, None, None, None
