"""Chunked GLA over segments, forward and backward, and the SSE mixer op built on it (docs/sse_layer.md, "Kernels").

The SSE op runs ONE chunked GLA over a stream of L * (1 + K) rows: the L shared-partition rows in token order,
then the L * K (token, sparse partition) pairs sorted by (sequence, partition, time) (see routing.py), with the
sparse q and k already multiplied by the router weight. Each (sequence, partition) segment is an independent GLA
sequence with its own initial and final state, so the state of partition j of sequence s is segment s * (N+1) + j.

Chunk math per segment (chunk size BT, b = cumsum of the log-decay g inside the chunk, per key channel,
bC = b at the chunk's last row, h = state before the chunk, scale folded into q):
    o_i = (q_i * e^{b_i}) h + sum_{j <= i} ((q_i * e^{b_i - b_j}) . k_j) v_j
    h'  = e^{bC} * h + sum_j (k_j * e^{bC - b_j})^T v_j
The intra-chunk products use a reference row r in the middle of the chunk, (q e^{b-r}) . (k e^{r-b}), so no
factor exceeds e^{half-chunk decay}: exact in fp32 while the per-token log-decay stays above -88/32 = -2.75
(a gate logit above -44 with the normaliser 16).

Kernels are launched on a fixed grid (an upper bound on the number of chunks) from a chunk table built on the
device, so nothing here synchronises with the host.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
from sse_rl.models.configuration import SSE_STATE_DTYPES
from sse_rl.models.ops.features import SSEFeatures
from sse_rl.models.ops.naive import check_routes
from sse_rl.models.ops.router import fused_router
from sse_rl.models.ops.routing import from_stream, sort_by_partition, to_stream

BT = 64
# Software-pipelining depth per kernel at num_warps 4: each kernel's fastest stage count at the 2B head size
# (dk = dv = 256), all below Triton's default of 3; 8 warps is slower for all five: bench/results/sse_kernel_launch.md.
STAGES = {"fwd_h": 2, "fwd_o": 1, "bwd_dh": 1, "bwd_dv": 1, "bwd_dqkg": 2}


def chunk_table(seg_start: torch.Tensor, seg_len: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of every segment, on the device: chunk_off [G+1] int32 (first chunk of each segment) and
    table [NC, 3] int32 rows (segment or -1 for the unused tail, first stream row, rows) with the static bound
    NC = cdiv(n_rows, BT) + G >= sum_g cdiv(seg_len_g, BT)."""
    G = seg_len.numel()
    n_chunks = (seg_len.long() + BT - 1) // BT
    chunk_off = torch.cat([n_chunks.new_zeros(1), n_chunks.cumsum(0)])              # [G+1]
    c = torch.arange(triton.cdiv(n_rows, BT) + G, device=seg_len.device)           # [NC]
    seg = torch.searchsorted(chunk_off[1:], c, right=True)                        # [NC]
    segc = seg.clamp(max=G - 1)
    start = seg_start[segc].long() + (c - chunk_off[segc]) * BT
    rows = torch.clamp(seg_start[segc].long() + seg_len[segc].long() - start, max=BT)
    table = torch.stack([torch.where(seg < G, seg, -1), start, rows], dim=1)      # [NC, 3]
    return chunk_off.int(), table.int()


@triton.jit
def load_rows(ptr, rows, m_t, cols, m_c, stride: tl.constexpr, other=0.0):
    """Block [BT, BC] of a row-major [rows, stride] view: rows `rows` [BT], columns `cols` [BC]."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m_t[:, None] & m_c[None, :], other=other)


@triton.jit
def gate_cumsum(p_g, rows, m_t, o_k, m_k, o_t, HK: tl.constexpr, BT: tl.constexpr):
    """In-chunk log-decay cumsum b [BT, BK] (fp32), its last row bC [BK] and the mid-chunk reference row r [BK]."""
    b_g = load_rows(p_g, rows, m_t, o_k, m_k, HK).to(tl.float32)
    b_b = tl.cumsum(b_g, 0)
    b_r = tl.sum(tl.where(o_t[:, None] == BT // 2, b_b, 0.0), 0)
    return b_b, tl.sum(b_g, 0), b_r


@triton.jit
def chunk_info(table, i_c):
    """(segment id, first row as int64, row count) of chunk i_c; segment < 0 marks an unused grid slot."""
    return tl.load(table + i_c * 3), tl.load(table + i_c * 3 + 1).to(tl.int64), tl.load(table + i_c * 3 + 2)


@triton.jit
def state_ptr(base, i_s, i_h, o_k, o_v, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr):
    """Pointers [BK, BV] into a [*, H, DK, DV] state tensor at state row i_s, head i_h."""
    return base + ((i_s.to(tl.int64) * H + i_h) * DK + o_k[:, None]) * DV + o_v[None, :]


@triton.jit
def chunk_fwd_h_kernel(
    k, v, g, h, h0, ht, seg_start, seg_len, chunk_off,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr,
):
    """Walks one segment's chunks in order, storing the state before each chunk in h[chunk] (tile [BK, BV])."""
    i_kv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(DV, BV), i_kv % tl.cdiv(DV, BV)
    bos, n, c0 = tl.load(seg_start + i_s).to(tl.int64), tl.load(seg_len + i_s), tl.load(chunk_off + i_s)
    o_t, o_k, o_v = tl.arange(0, BT), i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(state_ptr(h0, i_s, i_h, o_k, o_v, H, DK, DV), mask=m_kv, other=0.0).to(tl.float32)
    for i_t in range(tl.cdiv(n, BT)):
        tl.store(state_ptr(h, c0 + i_t, i_h, o_k, o_v, H, DK, DV), b_h.to(h.dtype.element_ty), mask=m_kv)
        rows, m_t = bos + i_t * BT + o_t, i_t * BT + o_t < n
        b_k = load_rows(k + i_h * DK, rows, m_t, o_k, m_k, H * DK)                   # [BT, BK]
        b_v = load_rows(v + i_h * DV, rows, m_t, o_v, m_v, H * DV)                   # [BT, BV]
        b_b, b_gl, _ = gate_cumsum(g + i_h * DK, rows, m_t, o_k, m_k, o_t, H * DK, BT)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_b)).to(b_v.dtype)                   # [BT, BK]
        b_h = b_h * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_kd), b_v, input_precision=PREC)
    if STORE_HT:
        tl.store(state_ptr(ht, i_s, i_h, o_k, o_v, H, DK, DV), b_h.to(ht.dtype.element_ty), mask=m_kv)


@triton.jit
def chunk_fwd_o_kernel(
    q, k, v, g, h, o, table, scale,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Output of one chunk (tile [BT, BV]): inter-chunk q h plus the causal intra-chunk attention."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, bos, n = chunk_info(table, i_c)
    if i_s < 0:
        return
    o_t, o_v = tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < n, o_v < DV
    rows = bos + o_t
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        b_q = load_rows(q + i_h * DK, rows, m_t, o_k, m_k, H * DK)                   # [BT, BK]
        b_k = load_rows(k + i_h * DK, rows, m_t, o_k, m_k, H * DK)                   # [BT, BK]
        b_b, _, b_r = gate_cumsum(g + i_h * DK, rows, m_t, o_k, m_k, o_t, H * DK, BT)
        b_qr = (b_q * tl.exp(b_b - b_r[None, :])).to(b_q.dtype)
        b_kr = (b_k * tl.exp(b_r[None, :] - b_b)).to(b_k.dtype)
        b_A += tl.dot(b_qr, tl.trans(b_kr), input_precision=PREC)                   # [BT, BT]
        b_h = tl.load(state_ptr(h, i_c, i_h, o_k, o_v, H, DK, DV), mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot((b_q * tl.exp(b_b)).to(b_q.dtype), b_h, input_precision=PREC)
    b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0.0)
    b_v = load_rows(v + i_h * DV, rows, m_t, o_v, m_v, H * DV)                       # [BT, BV]
    b_o = (b_o + tl.dot(b_A.to(b_v.dtype), b_v, input_precision=PREC)) * scale
    tl.store(o + i_h * DV + rows[:, None] * (H * DV) + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def chunk_bwd_dh_kernel(
    q, do, g, dh, dht, dh0, seg_start, seg_len, chunk_off, scale,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):
    """Walks one segment's chunks backwards, storing in dh[chunk] the gradient of the state AFTER each chunk."""
    i_kv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // tl.cdiv(DV, BV), i_kv % tl.cdiv(DV, BV)
    bos, n, c0 = tl.load(seg_start + i_s).to(tl.int64), tl.load(seg_len + i_s), tl.load(chunk_off + i_s)
    o_t, o_k, o_v = tl.arange(0, BT), i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    m_kv = m_k[:, None] & m_v[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(state_ptr(dht, i_s, i_h, o_k, o_v, H, DK, DV), mask=m_kv, other=0.0)
    NT = tl.cdiv(n, BT)
    for i in range(NT):
        i_t = NT - 1 - i
        tl.store(state_ptr(dh, c0 + i_t, i_h, o_k, o_v, H, DK, DV), b_dh.to(dh.dtype.element_ty), mask=m_kv)
        rows, m_t = bos + i_t * BT + o_t, i_t * BT + o_t < n
        b_q = load_rows(q + i_h * DK, rows, m_t, o_k, m_k, H * DK)                   # [BT, BK]
        b_do = load_rows(do + i_h * DV, rows, m_t, o_v, m_v, H * DV)                 # [BT, BV]
        b_b, b_gl, _ = gate_cumsum(g + i_h * DK, rows, m_t, o_k, m_k, o_t, H * DK, BT)
        b_qd = (b_q * tl.exp(b_b) * scale).to(b_do.dtype)
        b_dh = b_dh * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_qd), b_do, input_precision=PREC)
    if STORE_DH0:
        tl.store(state_ptr(dh0, i_s, i_h, o_k, o_v, H, DK, DV), b_dh, mask=m_kv)


@triton.jit
def chunk_bwd_dv_kernel(
    q, k, g, do, dh, dv, table, scale,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dv of one chunk (tile [BT, BV]): transposed intra-chunk attention times do, plus the decayed k dh'."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, bos, n = chunk_info(table, i_c)
    if i_s < 0:
        return
    o_t, o_v = tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < n, o_v < DV
    rows = bos + o_t
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_At = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        b_q = load_rows(q + i_h * DK, rows, m_t, o_k, m_k, H * DK)                   # [BT, BK]
        b_k = load_rows(k + i_h * DK, rows, m_t, o_k, m_k, H * DK)                   # [BT, BK]
        b_b, b_gl, b_r = gate_cumsum(g + i_h * DK, rows, m_t, o_k, m_k, o_t, H * DK, BT)
        b_qr = (b_q * tl.exp(b_b - b_r[None, :])).to(b_q.dtype)
        b_kr = (b_k * tl.exp(b_r[None, :] - b_b)).to(b_k.dtype)
        b_At += tl.dot(b_kr, tl.trans(b_qr), input_precision=PREC)                  # [BT(j), BT(i)]
        b_dh = tl.load(state_ptr(dh, i_c, i_h, o_k, o_v, H, DK, DV), mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_kd = (b_k * tl.exp(b_gl[None, :] - b_b)).to(b_dh.dtype)
        b_dv += tl.dot(b_kd, b_dh, input_precision=PREC)
    b_At = tl.where(o_t[None, :] >= o_t[:, None], b_At * scale, 0.0)
    b_do = load_rows(do + i_h * DV, rows, m_t, o_v, m_v, H * DV)                     # [BT, BV]
    b_dv += tl.dot(b_At.to(b_do.dtype), b_do, input_precision=PREC)
    tl.store(dv + i_h * DV + rows[:, None] * (H * DV) + o_v[None, :], b_dv.to(dv.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def chunk_bwd_dqkg_kernel(
    q, k, v, g, h, do, dh, dq, dk, dg, table, scale,
    H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dq, dk and the log-decay gradient dg of one chunk (tile [BT, BK]).

    dg: b_i enters as e^{b_i} with q_i and e^{-b_i} with k_i, so d b_i = q_i dq_i - k_i dk_i; the chunk's last
    row bC also scales the carried state and the k side of the state update; dg is the reverse cumsum of d b.
    """
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_s, bos, n = chunk_info(table, i_c)
    if i_s < 0:
        return
    o_t, o_k = tl.arange(0, BT), i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < n, o_k < DK
    rows = bos + o_t
    b_q = load_rows(q + i_h * DK, rows, m_t, o_k, m_k, H * DK)                       # [BT, BK]
    b_k = load_rows(k + i_h * DK, rows, m_t, o_k, m_k, H * DK)                       # [BT, BK]
    b_b, b_gl, b_r = gate_cumsum(g + i_h * DK, rows, m_t, o_k, m_k, o_t, H * DK, BT)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dgh = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        m_kv = m_k[:, None] & m_v[None, :]
        b_v = load_rows(v + i_h * DV, rows, m_t, o_v, m_v, H * DV)                   # [BT, BV]
        b_do = load_rows(do + i_h * DV, rows, m_t, o_v, m_v, H * DV)                 # [BT, BV]
        b_h = tl.load(state_ptr(h, i_c, i_h, o_k, o_v, H, DK, DV), mask=m_kv, other=0.0)    # [BK, BV]
        b_dh = tl.load(state_ptr(dh, i_c, i_h, o_k, o_v, H, DK, DV), mask=m_kv, other=0.0)  # [BK, BV]
        b_dA += tl.dot(b_do, tl.trans(b_v), input_precision=PREC)                   # [BT, BT]
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=PREC)                   # [BT, BK]
        b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision=PREC)                   # [BT, BK]
        b_dgh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)
    b_dA = tl.where(o_t[:, None] >= o_t[None, :], b_dA * scale, 0.0).to(b_q.dtype)
    b_qr = (b_q * tl.exp(b_b - b_r[None, :])).to(b_q.dtype)
    b_kr = (b_k * tl.exp(b_r[None, :] - b_b)).to(b_k.dtype)
    b_dq = b_dq * tl.exp(b_b) * scale + tl.dot(b_dA, b_kr, input_precision=PREC) * tl.exp(b_b - b_r[None, :])
    b_dki = b_dk * tl.exp(b_gl[None, :] - b_b)
    b_dk = b_dki + tl.dot(tl.trans(b_dA), b_qr, input_precision=PREC) * tl.exp(b_r[None, :] - b_b)
    b_db = b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk
    b_last = tl.sum(b_k.to(tl.float32) * b_dki, 0) + tl.exp(b_gl) * b_dgh           # [BK]
    b_dg = tl.sum(b_db, 0)[None, :] - tl.cumsum(b_db, 0) + b_db + b_last[None, :]
    m_tk = m_t[:, None] & m_k[None, :]
    p_off = i_h * DK + rows[:, None] * (H * DK) + o_k[None, :]
    tl.store(dq + p_off, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_off, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dg + p_off, b_dg.to(dg.dtype.element_ty), mask=m_tk)


def block_size(d: int) -> int:
    """Tile width over a head dim: a power of two in [32, 64]. 16-wide bf16 tiles hit illegal memory accesses
    with triton 3.6 on the H100, so small head dims are padded (masked) to 32."""
    return min(64, max(32, triton.next_power_of_2(d)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact (ieee) products so fp32 results match the reference; 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def chunk_gla_fwd(q, k, v, g, h0, seg_start, seg_len, chunk_off, table, scale: float, store_ht: bool):
    _, H, DK = q.shape
    DV, G, NC = v.shape[-1], seg_len.numel(), table.shape[0]
    BK, BV = block_size(DK), block_size(DV)
    meta = {"H": H, "DK": DK, "DV": DV, "BT": BT, "BK": BK, "BV": BV, "PREC": dot_precision(q.dtype)}
    h = q.new_empty(NC, H, DK, DV)
    # The final state keeps the initial state's storage dtype (a bf16 state cache stays bf16), fp32 without one.
    ht = q.new_empty(G, H, DK, DV, dtype=torch.float32 if h0 is None else h0.dtype) if store_ht else None
    grid = (triton.cdiv(DK, BK) * triton.cdiv(DV, BV), G, H)
    chunk_fwd_h_kernel[grid](k, v, g, h, h0, ht, seg_start, seg_len, chunk_off,
                             USE_H0=h0 is not None, STORE_HT=store_ht, num_stages=STAGES["fwd_h"], **meta)
    o = torch.empty_like(v)
    chunk_fwd_o_kernel[(triton.cdiv(DV, BV), NC, H)](q, k, v, g, h, o, table, scale, num_stages=STAGES["fwd_o"],
                                                     **meta)
    return o, h, ht


def chunk_gla_bwd(q, k, v, g, h, do, dht, seg_start, seg_len, chunk_off, table, scale: float, need_dh0: bool):
    _, H, DK = q.shape
    DV, G, NC = v.shape[-1], seg_len.numel(), table.shape[0]
    BK, BV = block_size(DK), block_size(DV)
    meta = {"H": H, "DK": DK, "DV": DV, "BT": BT, "BK": BK, "BV": BV, "PREC": dot_precision(q.dtype)}
    dh = torch.empty_like(h)
    dh0 = q.new_empty(G, H, DK, DV, dtype=torch.float32) if need_dh0 else None
    grid = (triton.cdiv(DK, BK) * triton.cdiv(DV, BV), G, H)
    chunk_bwd_dh_kernel[grid](q, do, g, dh, dht, dh0, seg_start, seg_len, chunk_off, scale,
                              USE_DHT=dht is not None, STORE_DH0=need_dh0, num_stages=STAGES["bwd_dh"], **meta)
    dv = torch.empty_like(v)
    chunk_bwd_dv_kernel[(triton.cdiv(DV, BV), NC, H)](q, k, g, do, dh, dv, table, scale,
                                                      num_stages=STAGES["bwd_dv"], **meta)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    chunk_bwd_dqkg_kernel[(triton.cdiv(DK, BK), NC, H)](q, k, v, g, h, do, dh, dq, dk, dg, table, scale,
                                                        num_stages=STAGES["bwd_dqkg"], **meta)
    return dq, dk, dv, dg, dh0


class ChunkGLASegmentsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, seg_start, seg_len, scale: float, store_ht: bool):
        chunk_off, table = chunk_table(seg_start, seg_len, q.shape[0])
        o, h, ht = chunk_gla_fwd(q, k, v, g, h0, seg_start, seg_len, chunk_off, table, scale, store_ht)
        ctx.save_for_backward(q, k, v, g, h, seg_start, seg_len, chunk_off, table)
        ctx.scale, ctx.has_h0 = scale, h0 is not None
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h, seg_start, seg_len, chunk_off, table = ctx.saved_tensors
        # The kernels index dense tensors; autograd may hand in expanded ones (the gradient of `final_state.sum()`).
        dht = dht.contiguous() if dht is not None else None
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(q, k, v, g, h, do.contiguous(), dht, seg_start, seg_len, chunk_off,
                                            table, ctx.scale, ctx.has_h0)
        return dq, dk, dv, dg, dh0, None, None, None, None


def chunk_gla_segments(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, seg_start: torch.Tensor,
    seg_len: torch.Tensor, *, scale: float, initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA over the segments of a packed stream: q, k, g [R, H, DK], v [R, H, DV]; segment i covers rows
    [seg_start[i], seg_start[i] + seg_len[i]) (int32, on the device, any order, empty allowed, rows of different
    segments disjoint). initial_state [G, H, DK, DV] fp32 or bf16 (computed in fp32) -> o [R, H, DV],
    final_state [G, H, DK, DV] in initial_state's dtype (fp32 without one)."""
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    h0 = initial_state.contiguous() if initial_state is not None else None
    return ChunkGLASegmentsFunction.apply(q, k, v, g, h0, seg_start, seg_len, scale, output_final_state)


def check_sse_inputs(*, features: SSEFeatures, router_logits: torch.Tensor, top_k: int,
                     initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                     routes: torch.Tensor | None = None) -> int:
    """Host-side checks of the SSE op (one block: the op's whole input contract); returns the number of sequences
    S. The values of a CUDA `cu_seqlens` are not checked: that would synchronise with the device (and break graph
    capture)."""
    q_shared, v = features.q_shared, features.v
    if q_shared.ndim != 4:
        raise ValueError(f"q_shared must be [B, T, H, dk], got {tuple(q_shared.shape)}")
    B, T, H, _ = q_shared.shape
    for name in ("k_shared", "q_sparse", "k_sparse", "g_shared", "g_sparse"):
        x = getattr(features, name)
        if x.shape != q_shared.shape:
            raise ValueError(f"{name} must have the shape of q_shared {tuple(q_shared.shape)}, got {tuple(x.shape)}")
    # Gates may stay fp32 beside 16-bit q/k/v (the model computes log-decays in fp32); kernels read them as fp32.
    gate_ok = all(g.dtype in (v.dtype, torch.float32) for g in (features.g_shared, features.g_sparse))
    if len({x.dtype for x in features[:5]}) != 1 or not gate_ok or \
            len({x.device for x in (*features, router_logits)}) != 1:
        raise ValueError("q/k/v inputs must share one dtype, gates that dtype or fp32, and all inputs one device, "
                         f"got {[(x.dtype, str(x.device)) for x in (*features, router_logits)]}")
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B={B}, T={T}, H={H}, dv], got {tuple(v.shape)}")
    if router_logits.ndim != 3 or router_logits.shape[:2] != (B, T):
        raise ValueError(f"router_logits must be [B={B}, T={T}, N], got {tuple(router_logits.shape)}")
    N = router_logits.shape[-1]
    if not 1 <= top_k <= N:
        raise ValueError(f"top_k must be in [1, N={N}], got {top_k}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (packed sequences), got B={B}")
    S = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if cu_seqlens is not None and not cu_seqlens.is_cuda:
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in itertools.pairwise(cu)):
            raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
    want = (S, *features.state_shape(N))
    if initial_state is not None and (tuple(initial_state.shape) != want or
                                      initial_state.dtype not in SSE_STATE_DTYPES):
        raise ValueError(f"initial_state must be fp32 or bf16 {want}, got {initial_state.dtype} "
                         f"{tuple(initial_state.shape)}")
    if routes is not None:
        check_routes(routes, (B, T), top_k, N)
        if routes.device != router_logits.device:
            raise ValueError(f"routes must be on the device of router_logits ({router_logits.device}), "
                             f"got {routes.device}")
    return S


def sse_triton(
    *, features: SSEFeatures, router_logits: torch.Tensor, top_k: int, scale: float | None = None,
    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None, routes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sse_rl.models.ops.sse_chunk` (arguments and returns documented there) with Triton kernels: router (or the
    forced `routes`), counting-sort routing, one chunked GLA over [shared | sorted sparse] and a gather back to
    token order.

    Examples::
        >>> o, state = sse_triton(features=SSEFeatures(q1, k1, q2, k2, v, g1, g2), router_logits=logits, top_k=1,
        ...                       output_final_state=True)
    """
    S = check_sse_inputs(features=features, router_logits=router_logits, top_k=top_k, initial_state=initial_state,
                         cu_seqlens=cu_seqlens, routes=routes)
    B, T, H, DK = features.q_shared.shape
    N, DV, L = router_logits.shape[-1], features.v.shape[-1], B * T
    if cu_seqlens is None:
        cu_seqlens = torch.arange(B + 1, device=features.v.device) * T
    _, weights, indices = fused_router(router_logits.reshape(L, N), top_k=top_k,
                                       routes=routes.reshape(L, top_k) if routes is not None else None)  # [L, K]
    routing = sort_by_partition(indices, cu_seqlens, N)

    def stream(shared: torch.Tensor, sparse: torch.Tensor, weighted: bool) -> torch.Tensor:
        return to_stream(shared.reshape(L, H, -1), sparse.reshape(L, H, -1), routing,
                         weights if weighted else None)                                    # [L*(1+K), H, d]

    # Segment s * (N+1) + j is partition j of sequence s: the states flatten to segments and back.
    h0 = initial_state.flatten(0, 1) if initial_state is not None else None              # [S*(N+1), H, DK, DV]
    o, ht = chunk_gla_segments(
        stream(features.q_shared, features.q_sparse, True), stream(features.k_shared, features.k_sparse, True),
        stream(features.v, features.v, False), stream(features.g_shared, features.g_sparse, False),
        routing.seg_start, routing.seg_len, scale=DK ** -0.5 if scale is None else scale, initial_state=h0,
        output_final_state=output_final_state,
    )
    o = from_stream(o, routing)                                                           # [L, H, DV]
    return o.view(B, T, H, DV), ht.view(S, *features.state_shape(N)) if ht is not None else None
