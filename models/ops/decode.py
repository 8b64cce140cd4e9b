"""Fused SSE decode step: router + shared and top-K partition updates + read-out, in place on a slot cache.

One program owns one (sequence, head, dv-tile): it routes the token (same softmax/top-K code as router.py), then
for the shared partition and each selected partition walks the state tile [dk, BV] of
`state[slot, partition, head]` in blocks of BK rows: load, decay and add k^T v, store back, accumulate the read-out.
The state is stored in fp32 or bf16 (`SSE_STATE_DTYPES`) and updated in fp32 registers either way: a bf16 state is
cast up on load and rounded once on store, and the read-out uses the fp32 value before that rounding.
A step moves exactly the (K+1) touched partitions' states once in and once out, so the kernel is bound by memory
bandwidth (half the bytes with a bf16 state). Small row blocks without software pipelining keep few registers per
program, so many programs stream at once, which comes closer to copy bandwidth than loading whole [dk, BV] tiles:
bench/results/sse_kernel_launch.md.
Rows with a negative slot id (padding) write a zero output and touch no state.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from sse_rl.models.configuration import SSE_STATE_DTYPES
from sse_rl.models.ops.features import SSEFeatures
from sse_rl.models.ops.router import pick_top1, router_softmax, topk_candidates

DECODE_BK, DECODE_BV = 16, 64


@triton.jit
def update_partition(slot_state, i_p, i_h, o_v, m_v, q, k, g, p_k, b_w, b_v,
                     H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """S <- diag(exp g) S + (w k)^T v on the tile [DK, BV] of partition i_p, head i_h of one slot, in BK-row blocks
    stored in place; returns (w q) S [BV]. q/k/g point at the token's head rows (offset p_k)."""
    b_o = tl.zeros([BV], dtype=tl.float32)
    for i_k in tl.range(0, DK, BK, num_stages=1):
        o_k = i_k + tl.arange(0, BK)
        m_k = o_k < DK
        m_kv = m_k[:, None] & m_v[None, :]
        p_s = slot_state + ((i_p * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]
        b_s = tl.load(p_s, mask=m_kv, other=0.0).to(tl.float32)
        b_q = tl.load(q + p_k + o_k, mask=m_k, other=0.0).to(tl.float32) * b_w
        b_k = tl.load(k + p_k + o_k, mask=m_k, other=0.0).to(tl.float32) * b_w
        b_g = tl.load(g + p_k + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None] + b_k[:, None] * b_v[None, :]
        tl.store(p_s, b_s.to(slot_state.dtype.element_ty), mask=m_kv)
        b_o += tl.sum(b_q[:, None] * b_s, 0)
    return b_o


@triton.jit
def sse_decode_kernel(
    q_sh, k_sh, q_sp, k_sp, v, g_sh, g_sp, logits, state, stride_slot, slot_ids, o, scale,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr,
):
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_v, o_n = i_v * BV + tl.arange(0, BV), tl.arange(0, BN)
    m_v = o_v < DV
    p_o = o + (i_b * H + i_h) * DV + o_v
    i_slot = tl.load(slot_ids + i_b).to(tl.int64)
    if i_slot < 0:
        tl.store(p_o, tl.zeros([BV], dtype=tl.float32).to(o.dtype.element_ty), mask=m_v)
        return
    b_x = tl.load(logits + i_b * N + o_n, mask=o_n < N, other=0.0)
    b_p = router_softmax(b_x[None, :], o_n, N)                                   # [1, BN]
    b_rem = topk_candidates(b_p, o_n, N)
    b_v = tl.load(v + (i_b * H + i_h) * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
    slot_state, p_k = state + i_slot * stride_slot, (i_b * H + i_h) * DK
    b_o = update_partition(slot_state, 0, i_h, o_v, m_v, q_sh, k_sh, g_sh, p_k, 1.0, b_v, H, DK, DV, BK, BV)
    for _ in tl.static_range(K):
        _, b_idx, b_rem = pick_top1(b_rem, o_n)                                   # [1]
        b_w = tl.sum(tl.sum(tl.where(o_n[None, :] == b_idx[:, None], b_p, 0.0), 1), 0)
        b_o += update_partition(slot_state, 1 + tl.sum(b_idx, 0), i_h, o_v, m_v, q_sp, k_sp, g_sp, p_k, b_w, b_v,
                                H, DK, DV, BK, BV)
    tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=m_v)


def check_decode_inputs(*, features: SSEFeatures, router_logits: torch.Tensor, state: torch.Tensor,
                        slot_ids: torch.Tensor, top_k: int) -> None:
    """Host-side checks of the decode op (one block: the op's whole input contract)."""
    q_shared, v = features.q_shared, features.v
    B, H, _ = q_shared.shape
    for name in ("k_shared", "q_sparse", "k_sparse", "g_shared", "g_sparse"):
        x = getattr(features, name)
        if x.shape != q_shared.shape:
            raise ValueError(f"{name} must have the shape of q_shared {tuple(q_shared.shape)}, got {tuple(x.shape)}")
    if v.ndim != 3 or v.shape[:2] != (B, H):
        raise ValueError(f"v must be [B={B}, H={H}, dv], got {tuple(v.shape)}")
    if router_logits.ndim != 2 or router_logits.shape[0] != B:
        raise ValueError(f"router_logits must be [B={B}, N], got {tuple(router_logits.shape)}")
    N = router_logits.shape[1]
    if not 1 <= top_k <= N:
        raise ValueError(f"top_k must be in [1, N={N}], got {top_k}")
    want = features.state_shape(N)
    if state.ndim != 5 or tuple(state.shape[1:]) != want or state.dtype not in SSE_STATE_DTYPES:
        raise ValueError(f"state must be fp32 or bf16 [num_slots, {', '.join(map(str, want))}], "
                         f"got {state.dtype} {tuple(state.shape)}")
    # vLLM's state cache pads each slot (row stride >= the state size): only each slot must be dense.
    if not state[0].is_contiguous():
        raise ValueError(f"each slot of state must be contiguous (updated in place), got strides {state.stride()}")
    if slot_ids.shape != (B,) or slot_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_ids must be int32/int64 [B={B}], got {slot_ids.dtype} {tuple(slot_ids.shape)}")


def sse_decode_triton(
    *, features: SSEFeatures, router_logits: torch.Tensor, state: torch.Tensor, slot_ids: torch.Tensor, top_k: int,
    scale: float | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sse_rl.models.ops.sse_decode` (arguments and returns documented there) as one fused Triton kernel.

    Examples::
        >>> o = sse_decode_triton(features=SSEFeatures(q1, k1, q2, k2, v, g1, g2), router_logits=logits,
        ...                       state=state, slot_ids=slots, top_k=1)
    """
    check_decode_inputs(features=features, router_logits=router_logits, state=state, slot_ids=slot_ids, top_k=top_k)
    B, H, DK = features.q_shared.shape
    v, N = features.v, router_logits.shape[1]
    DV = v.shape[-1]
    BK, BV = min(DECODE_BK, triton.next_power_of_2(DK)), min(DECODE_BV, max(16, triton.next_power_of_2(DV)))
    if out is None:
        out = torch.empty_like(v)
    elif out.shape != v.shape or out.dtype != v.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {v.dtype} tensor of v's shape {tuple(v.shape)}, "
                         f"got {out.dtype} {tuple(out.shape)} with strides {out.stride()}")
    feats = features.map(torch.Tensor.contiguous)
    scale = DK ** -0.5 if scale is None else scale
    # The kernel takes the features in SSEFeatures' order.
    sse_decode_kernel[(triton.cdiv(DV, BV), B, H)](
        *feats, router_logits.contiguous(), state, state.stride(0), slot_ids, out, scale,
        H=H, DK=DK, DV=DV, N=N, K=top_k, BK=BK, BV=BV, BN=triton.next_power_of_2(N),
    )
    return out
