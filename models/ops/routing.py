"""Token routing of the SSE "varlen" form (docs/sse_layer.md, "Kernels") without host synchronisation.

Each token is written to K sparse partitions. The (token, partition) pairs are put in (sequence, partition, time)
order by a stable counting sort per sequence: a prefix count of the partition hits along the packed
tokens gives every pair its rank inside its (sequence, partition) segment, and an exclusive scan of the segment
sizes gives the segment offsets. Everything stays on the device with static shapes (no `.item()`, no `unique`,
empty segments kept), so prefill can be CUDA-graph captured.

The sorted pairs follow the L shared-stream rows in one stream of L * (1 + K) rows, whose segments are indexed like
the state: segment `s * (N + 1) + j` is sequence s, partition j (0 = shared, 1 + i = sparse partition i).
Moving rows between token order and segment order is a gather both ways (the backward of one is the other), so
nothing uses atomics and the results are deterministic. Each move is one Triton kernel that reads and writes every
row once, with the router weight applied (and its gradient reduced) on the way, rather than separate PyTorch
gathers, copies and multiplies, which cost a large share of a 2B training step: bench/results/train_step_h100.md
("Routing moves as Triton kernels").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BR, BW = 16, 256  # rows x columns per program of the two kernels


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
    return Routing(perm, inv, seg_start.flatten().int(), seg_len.flatten().int(), K)


@triton.jit(do_not_specialize=["L"])
def stream_kernel(shared, sparse, weights, perm, out, L, W: tl.constexpr, K: tl.constexpr,
                  WEIGHTED: tl.constexpr, BR: tl.constexpr, BW: tl.constexpr):
    """Tile [BR, BW] of the stream: row r < L is shared[r]; row L + i is sparse[token of pair perm[i]], times that
    pair's router weight when WEIGHTED (product in fp32)."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_c = tl.program_id(1) * BW + tl.arange(0, BW)
    m_c = o_c < W
    m_sh, m_sp = o_r < L, (o_r >= L) & (o_r < L * (1 + K))
    pair = tl.load(perm + o_r - L, mask=m_sp, other=0)
    b_sh = tl.load(shared + o_r[:, None] * W + o_c[None, :], mask=m_sh[:, None] & m_c[None, :], other=0.0)
    b_sp = tl.load(sparse + (pair // K)[:, None] * W + o_c[None, :], mask=m_sp[:, None] & m_c[None, :], other=0.0)
    if WEIGHTED:
        b_w = tl.load(weights + pair, mask=m_sp, other=0.0).to(tl.float32)
        b_sp = (b_sp.to(tl.float32) * b_w[:, None]).to(b_sh.dtype)
    tl.store(out + o_r[:, None] * W + o_c[None, :], tl.where(m_sh[:, None], b_sh, b_sp),
             mask=(m_sh | m_sp)[:, None] & m_c[None, :])


@triton.jit(do_not_specialize=["L"])
def pair_sum_kernel(stream, inv, weights, sparse, out, dweights, L, W: tl.constexpr, K: tl.constexpr,
                    KP: tl.constexpr, ADD_SHARED: tl.constexpr, WEIGHTED: tl.constexpr, BR: tl.constexpr,
                    BW: tl.constexpr):
    """Rows [BR] of the token-order sum out[t] = (stream[t] if ADD_SHARED) + sum_k w_tk stream[L + inv[t K + k]]
    (w = 1 unless WEIGHTED), accumulated in fp32. When WEIGHTED, also dweights[t, k] = <stream[L + inv[t K + k]],
    sparse[t]>: the router-weight gradient of a weighted stream, whose backward this then is."""
    o_t = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KP)
    m_t = o_t < L
    b_dw = tl.zeros([BR, KP], dtype=tl.float32)
    for c0 in range(0, W, BW):
        o_c = c0 + tl.arange(0, BW)
        m_tc = m_t[:, None] & (o_c < W)[None, :]
        b_o = tl.zeros([BR, BW], dtype=tl.float32)
        if ADD_SHARED:
            b_o += tl.load(stream + o_t[:, None] * W + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        if WEIGHTED:
            b_x = tl.load(sparse + o_t[:, None] * W + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            row = L + tl.load(inv + o_t * K + k, mask=m_t, other=0)
            b_d = tl.load(stream + row[:, None] * W + o_c[None, :], mask=m_tc, other=0.0).to(tl.float32)
            if WEIGHTED:
                b_o += b_d * tl.load(weights + o_t * K + k, mask=m_t, other=0.0).to(tl.float32)[:, None]
                b_dw += tl.where(o_k[None, :] == k, tl.sum(b_d * b_x, 1)[:, None], 0.0)
            else:
                b_o += b_d
        tl.store(out + o_t[:, None] * W + o_c[None, :], b_o.to(out.dtype.element_ty), mask=m_tc)
    if WEIGHTED:
        tl.store(dweights + o_t[:, None] * K + o_k[None, :], b_dw, mask=m_t[:, None] & (o_k < K)[None, :])


def build_stream(shared: torch.Tensor, sparse: torch.Tensor, perm: torch.Tensor, top_k: int,
                 weights: torch.Tensor | None) -> torch.Tensor:
    """Launch `stream_kernel`: [L, ...] x2 -> [L * (1 + K), ...] (an unused pointer argument gets any tensor)."""
    L, W = shared.shape[0], math.prod(shared.shape[1:])
    out = shared.new_empty(L * (1 + top_k), *shared.shape[1:])
    grid = (triton.cdiv(out.shape[0], BR), triton.cdiv(W, BW))
    stream_kernel[grid](shared, sparse, weights if weights is not None else perm, perm, out, L, W=W, K=top_k,
                        WEIGHTED=weights is not None, BR=BR, BW=BW)
    return out


def pair_sum(stream: torch.Tensor, inv: torch.Tensor, top_k: int, add_shared: bool,
             weights: torch.Tensor | None = None,
             sparse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch `pair_sum_kernel`: the token-order sum [L, ...] of a stream, and with `weights` [L, K] (and the
    unweighted `sparse` rows) the weight gradient [L, K] fp32, else None."""
    L = stream.shape[0] // (1 + top_k)
    W = math.prod(stream.shape[1:])
    out = stream.new_empty(L, *stream.shape[1:])
    dweights = stream.new_empty(L, top_k, dtype=torch.float32) if weights is not None else None
    pair_sum_kernel[(triton.cdiv(L, BR),)](
        stream, inv, weights if weights is not None else inv, sparse if sparse is not None else stream, out,
        dweights if dweights is not None else inv, L, W=W, K=top_k, KP=triton.next_power_of_2(top_k),
        ADD_SHARED=add_shared, WEIGHTED=weights is not None, BR=BR, BW=BW)
    return out, dweights


def to_stream(shared: torch.Tensor, sparse: torch.Tensor, routing: Routing,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """The stream [shared rows | each token's sparse row once per routed pair, in segment order], the sparse rows
    multiplied by their pair's weight when `weights [L, K]` is given: [L, ...] x2 -> [L * (1 + K), ...]."""
    return ToStream.apply(shared, sparse, weights, routing.perm, routing.inv, routing.top_k)


def from_stream(stream: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Token-order sum of a stream [L * (1 + K), ...]: the shared row plus the token's K sparse rows -> [L, ...]."""
    return FromStream.apply(stream, routing.perm, routing.inv, routing.top_k)


class ToStream(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shared, sparse, weights, perm, inv, top_k: int):
        shared, sparse = shared.contiguous(), sparse.contiguous()
        weights = weights.contiguous() if weights is not None else None
        ctx.save_for_backward(sparse if weights is not None else None, weights, inv)
        ctx.top_k = top_k
        return build_stream(shared, sparse, perm, top_k, weights)

    @staticmethod
    def backward(ctx, dout):
        sparse, weights, inv = ctx.saved_tensors
        dout = dout.contiguous()
        dsparse, dweights = pair_sum(dout, inv, ctx.top_k, False, weights, sparse)
        return dout[:inv.numel() // ctx.top_k], dsparse, dweights, None, None, None


class FromStream(torch.autograd.Function):
    @staticmethod
    def forward(ctx, stream, perm, inv, top_k: int):
        ctx.save_for_backward(perm)
        ctx.top_k = top_k
        return pair_sum(stream.contiguous(), inv, top_k, True)[0]

    @staticmethod
    def backward(ctx, dy):
        (perm,) = ctx.saved_tensors
        dy = dy.contiguous()
        return build_stream(dy, dy, perm, ctx.top_k, None), None, None, None
