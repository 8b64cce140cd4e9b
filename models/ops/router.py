"""Fused SSE router: softmax over the N partitions, top-K and the selected weights, forward and backward.

One program handles BM tokens. The weights are the probabilities of the chosen partitions, NOT renormalised over
the top-K (docs/sse_layer.md, "Router"), and ties go to the lower partition index (fla's mask kernel).
Probabilities and weights are fp32 whatever the logits' dtype, because the router's softmax is computed in fp32 in
every implementation.
Indices get no gradient; the gradient reaches the logits through the weights and (for the aux loss) the probs.
With forced partitions (`routes`, routing replay) the kernel reads the indices instead of picking them and gathers
the probabilities there; the backward is the same.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from sse_rl.models.ops.naive import check_routes

ROUTER_BM = 32


@triton.jit
def pick_top1(b_rem, o_n):
    """Largest remaining entry per row of `b_rem` [BM, BN]: (value [BM], lowest index among ties [BM], b_rem with
    that entry knocked out). Callers set padded and already-picked entries to -1 so they are never chosen."""
    b_max = tl.max(b_rem, 1)
    b_idx = tl.min(tl.where(b_rem == b_max[:, None], o_n[None, :], o_n.shape[0]), 1)
    b_rem = tl.where(o_n[None, :] == b_idx[:, None], -1.0, b_rem)
    return b_max, b_idx, b_rem


@triton.jit
def router_softmax(b_x, o_n, N: tl.constexpr):
    """fp32 softmax over the first N columns of the logits block `b_x` [BM, BN]; padded columns get probability 0."""
    b_x = tl.where(o_n[None, :] < N, b_x.to(tl.float32), float("-inf"))
    b_e = tl.exp(b_x - tl.max(b_x, 1)[:, None])
    return b_e / tl.sum(b_e, 1)[:, None]


@triton.jit
def topk_candidates(b_p, o_n, N: tl.constexpr):
    """Selection copy of the probs [BM, BN]: padded columns -1 (never picked) and NaN rows turned into a valid
    tie (NaN >= 0 is false), so a NaN token still picks K distinct in-range partitions (its weights stay NaN)."""
    b_rem = tl.where(b_p >= 0.0, b_p, 0.0)
    return tl.where(o_n[None, :] < N, b_rem, -1.0)


@triton.jit(do_not_specialize=["M"])
def router_fwd_kernel(
    logits, probs, weights, indices, M,
    N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, FORCED: tl.constexpr,
):
    """Probs, top-K weights and indices of BM tokens; with FORCED the indices are inputs (read, not picked)."""
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m_m = o_m < M
    m_x = m_m[:, None] & (o_n < N)[None, :]
    b_x = tl.load(logits + o_m[:, None] * N + o_n[None, :], mask=m_x, other=0.0)
    b_p = router_softmax(b_x, o_n, N)
    tl.store(probs + o_m[:, None] * N + o_n[None, :], b_p, mask=m_x)
    b_rem = topk_candidates(b_p, o_n, N)
    for r in tl.static_range(K):
        if FORCED:
            b_idx = tl.load(indices + o_m * K + r, mask=m_m, other=0)
        else:
            _, b_idx, b_rem = pick_top1(b_rem, o_n)
        b_w = tl.sum(tl.where(o_n[None, :] == b_idx[:, None], b_p, 0.0), 1)
        tl.store(weights + o_m * K + r, b_w, mask=m_m)
        if not FORCED:
            tl.store(indices + o_m * K + r, b_idx.to(tl.int64), mask=m_m)


@triton.jit(do_not_specialize=["M"])
def router_bwd_kernel(
    probs, dprobs, dweights, indices, dlogits, M,
    N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    HAS_DPROBS: tl.constexpr, HAS_DWEIGHTS: tl.constexpr,
):
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    m_m = o_m < M
    m_x = m_m[:, None] & (o_n < N)[None, :]
    b_p = tl.load(probs + o_m[:, None] * N + o_n[None, :], mask=m_x, other=0.0)
    b_dp = tl.zeros([BM, BN], dtype=tl.float32)
    if HAS_DPROBS:
        b_dp += tl.load(dprobs + o_m[:, None] * N + o_n[None, :], mask=m_x, other=0.0).to(tl.float32)
    if HAS_DWEIGHTS:
        for r in tl.static_range(K):
            b_idx = tl.load(indices + o_m * K + r, mask=m_m, other=0)
            b_dw = tl.load(dweights + o_m * K + r, mask=m_m, other=0.0).to(tl.float32)
            b_dp += tl.where(o_n[None, :] == b_idx[:, None], b_dw[:, None], 0.0)
    # softmax backward: dx = p * (dp - <p, dp>)
    b_dx = b_p * (b_dp - tl.sum(b_p * b_dp, 1)[:, None])
    tl.store(dlogits + o_m[:, None] * N + o_n[None, :], b_dx.to(dlogits.dtype.element_ty), mask=m_x)


def router_fwd(logits: torch.Tensor, top_k: int,
               routes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [M, N], routes [M, K] or None -> probs [M, N] fp32, weights [M, K] fp32, indices [M, K] int64."""
    M, N = logits.shape
    probs = logits.new_empty(M, N, dtype=torch.float32)
    weights = logits.new_empty(M, top_k, dtype=torch.float32)
    if routes is None:
        indices = logits.new_empty(M, top_k, dtype=torch.int64)
    else:  # a copy: the indices are an output, saved for backward, and must not alias the caller's tensor
        indices = routes.to(dtype=torch.int64, copy=True).contiguous()
    grid = (triton.cdiv(M, ROUTER_BM),)
    router_fwd_kernel[grid](logits, probs, weights, indices, M, N=N, K=top_k, BM=ROUTER_BM,
                            BN=triton.next_power_of_2(N), FORCED=routes is not None)
    return probs, weights, indices


def router_bwd(probs: torch.Tensor, indices: torch.Tensor, dprobs: torch.Tensor | None,
               dweights: torch.Tensor | None, logits_dtype: torch.dtype) -> torch.Tensor:
    M, N = probs.shape
    dlogits = probs.new_empty(M, N, dtype=logits_dtype)
    grid = (triton.cdiv(M, ROUTER_BM),)
    router_bwd_kernel[grid](
        probs, dprobs.contiguous() if dprobs is not None else probs,
        dweights.contiguous() if dweights is not None else probs, indices, dlogits, M,
        N=N, K=indices.shape[1], BM=ROUTER_BM, BN=triton.next_power_of_2(N),
        HAS_DPROBS=dprobs is not None, HAS_DWEIGHTS=dweights is not None,
    )
    return dlogits


class RouterFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, top_k: int, routes: torch.Tensor | None):
        probs, weights, indices = router_fwd(logits, top_k, routes)
        ctx.save_for_backward(probs, indices)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(indices)
        return probs, weights, indices

    @staticmethod
    def backward(ctx, dprobs, dweights, _dindices):
        probs, indices = ctx.saved_tensors
        return router_bwd(probs, indices, dprobs, dweights, ctx.logits_dtype), None, None


def fused_router(router_logits: torch.Tensor, *, top_k: int,
                 routes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `sse_router`: `router_logits [..., N]` -> probs [..., N] fp32, weights [..., K] fp32 (top-K probs,
    not renormalised), indices [..., K] int64 (descending weight, ties -> lower index). With `routes` [..., K]
    (forced partitions, `naive.check_routes`) the indices are those and the weights the probs there.

    Examples::
        >>> probs, w, idx = fused_router(torch.randn(1, 5, 4, device="cuda"), top_k=1)
    """
    if router_logits.ndim < 1 or not router_logits.is_floating_point():
        raise ValueError(f"router_logits must be a floating tensor [..., N], got {router_logits.dtype} "
                         f"of shape {tuple(router_logits.shape)}")
    N = router_logits.shape[-1]
    if not 1 <= top_k <= N:
        raise ValueError(f"top_k must be in [1, N={N}], got {top_k}")
    lead = router_logits.shape[:-1]
    if routes is not None:
        check_routes(routes, tuple(lead), top_k, N)
        routes = routes.reshape(-1, top_k)
    probs, weights, indices = RouterFunction.apply(router_logits.reshape(-1, N).contiguous(), top_k, routes)
    return probs.view(*lead, N), weights.view(*lead, top_k), indices.view(*lead, top_k)

