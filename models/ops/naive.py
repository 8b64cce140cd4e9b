"""PyTorch reference implementations of the SSE mixer op: the oracle every kernel is tested against.

Semantics (docs/sse_layer.md, "Recurrence"), per sequence and head, state S_p in R^{dk x dv} for partitions
p = 0..N:
  e = softmax(router_logits) (fp32), (w, idx) = top-K of e (not renormalised; ties go to the lower index)
  shared:  S_0 <- diag(exp(g_sh)) S_0 + k_sh^T v ;                o  = scale * q_sh S_0
  routed:  S_1+i <- diag(exp(g_sp)) S_1+i + (w_i k_sp)^T v ;      o += scale * (w_i q_sp) S_1+i   (i in idx)
  partitions that are not selected are neither written nor decayed.

Three equivalent forms with the signature of `sse_rl.models.ops.sse_chunk` (arguments and shapes documented there):
- `sse_recurrent`:    the per-token loop, i.e. the definition.
- `sse_chunk_varlen`: fla's "varlen" form: (token, partition) pairs sorted by (sequence, partition, time) become
                      segments of one chunked-GLA call over [shared || sorted sparse]; the outputs are combined by
                      inverting the permutation (a gather, no index_add atomics).
- `sse_mask`:         fla's "mask" form: (N+1)*H heads with masked q/k/v/g, one chunked-GLA call.
`sse_decode` is one decoding step on a slot-indexed state cache, with the signature of `sse_rl.models.ops.sse_decode`.
All compute in fp32, or fp64 when the inputs are fp64 (the tests use fp64 to compare the forms to 1e-10);
outputs are cast to v's dtype and final states stay in the compute dtype. A state stored in bf16 (an engine's state
cache, `configuration.SSE_STATE_DTYPES`) is cast up on load, and the chunk forms return their final states in bf16
for a bf16 initial state, as the Triton ops do.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from sse_rl.models.configuration import SSE_STATE_DTYPES
from sse_rl.models.ops.features import SSEFeatures
from torch import Tensor

# The state dtypes the reference takes: the ops' (fp32, bf16) and fp64, its exact mode.
STATE_DTYPES = (*SSE_STATE_DTYPES, torch.float64)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sse_router(router_logits: Tensor, *, top_k: int, routes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over the N partitions in fp32 and the top-k partitions (ties broken toward the lower index), or the
    partitions `routes` forces (routing replay): then the weights are the probabilities at those partitions.

    Args:
        router_logits: [..., N] raw e_proj output; top_k: K, the partitions each token selects;
        routes: [..., K] integer partitions to use instead of the top-k (`check_routes`), or None.
    Returns:
        probs [..., N] (fp32, fp64 for fp64 input), weights [..., K] (the selected probs, not renormalised),
        indices [..., K] int64.
    """
    n = router_logits.shape[-1]
    if not 1 <= top_k <= n:
        raise ValueError(f"top_k must be in [1, num_sparse_partition={n}], got {top_k}")
    probs = F.softmax(router_logits.to(_compute_dtype(router_logits)), dim=-1)  # [..., N]
    if routes is not None:
        check_routes(routes, router_logits.shape[:-1], top_k, n)
        indices = routes.to(device=probs.device, dtype=torch.long)  # [..., K]
        return probs, probs.gather(-1, indices), indices
    # A stable descending sort keeps equal probabilities in index order, so ties go to the lower index.
    weights, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return probs, weights[..., :top_k], indices[..., :top_k]


def check_routes(routes: Tensor, lead_shape: tuple[int, ...], top_k: int, num_partitions: int) -> None:
    """Check forced partitions `routes` [*lead_shape, K]: an integer tensor of that shape whose entries lie in
    [0, N) and differ within each token. The values are not checked on CUDA (that would synchronise with the
    device and break graph capture): the model checks them once per forward (`modeling.check_routes_values`)."""
    want = (*lead_shape, top_k)
    if routes.is_floating_point() or routes.is_complex() or routes.dtype == torch.bool or \
            tuple(routes.shape) != want:
        raise ValueError(f"routes must be an integer tensor of shape {want}, got {routes.dtype} "
                         f"{tuple(routes.shape)}")
    if routes.is_cuda or routes.numel() == 0:
        return
    r = routes.long()
    if bool(((r < 0) | (r >= num_partitions)).any()):
        raise ValueError(f"routes must lie in [0, num_sparse_partition={num_partitions}), got values "
                         f"{sorted(set(r[(r < 0) | (r >= num_partitions)].tolist()))[:8]}")
    if top_k > 1 and bool((r.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError("routes must name K distinct partitions per token, got a repeated partition")


def sse_aux_loss(probs: Tensor, indices: Tensor, mask: Tensor | None = None) -> Tensor:
    """Partition balance loss `(N/K) * sum_i mean_t(probs_i) * mean_t(1[i in top-k])`, in fp32 over real tokens.

    Args:
        probs: [..., N] router probabilities; indices: [..., K] selected partitions;
        mask: [...] bool, True for real (non-pad) tokens; None means all tokens are real.
    """
    n, k = probs.shape[-1], indices.shape[-1]
    probs = probs.reshape(-1, n).float()  # [L, N]
    chosen = torch.zeros_like(probs).scatter_(-1, indices.reshape(-1, k), 1.0)  # [L, N]
    if mask is not None:
        keep = mask.reshape(-1)
        probs, chosen = probs[keep], chosen[keep]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return (n / k) * (probs.mean(0) * chosen.mean(0)).sum()


def _sequence_bounds(batch: int, length: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every sequence: the batch rows, or the packed segments of cu_seqlens."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got {batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(a > b for a, b in pairwise(bounds)):
        raise ValueError(f"cu_seqlens must rise from 0 to T={length}, got {bounds}")
    return [(0, a, b) for a, b in pairwise(bounds)]


def _check_state(initial_state: Tensor | None, num_seqs: int, shape: tuple[int, ...]) -> None:
    if initial_state is not None and (tuple(initial_state.shape) != (num_seqs, *shape) or
                                      initial_state.dtype not in STATE_DTYPES):
        raise ValueError(f"initial_state must be fp32, bf16 or fp64 of shape {(num_seqs, *shape)}, got "
                         f"{initial_state.dtype} {tuple(initial_state.shape)}")


def _final_dtype(initial_state: Tensor | None, compute: torch.dtype) -> torch.dtype:
    """The dtype of a returned final state: bf16 for a bf16 initial state (its storage dtype), else `compute`."""
    return torch.bfloat16 if initial_state is not None and initial_state.dtype == torch.bfloat16 else compute


def gla_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float, initial_state: Tensor | None = None,
              cu_seqlens: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Chunked gated linear attention (GLA), per sequence: o_t = scale * q_t S_t, S_t = diag(exp g_t) S_t-1 + k_t^T v_t.

    Inside a chunk the decays enter only as exp(b_i - b_j) with j <= i (b = cumulative log-decay), so no term
    overflows however strong the decay. Zero-length segments pass their initial state through.
    Args:
        q, k, g: [B, T, H, dk]; v: [B, T, H, dv]; scale: applied to q; initial_state: [S, H, dk, dv] or None
        (zeros); cu_seqlens: [S+1] packed segment bounds (B must be 1) or None (S = B); chunk_size: rows per chunk.
    Returns:
        o [B, T, H, dv] and final states [S, H, dk, dv], both in the inputs' dtype.
    """
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    bounds = _sequence_bounds(batch, length, cu_seqlens)
    _check_state(initial_state, len(bounds), (heads, dk, dv))
    outputs, finals = [], []
    for s, (b, start, end) in enumerate(bounds):
        state = q.new_zeros(heads, dk, dv) if initial_state is None else initial_state[s].to(q.dtype)
        for c0 in range(start, end, chunk_size):
            c1 = min(c0 + chunk_size, end)
            o_c, state = _gla_one_chunk(q[b, c0:c1], k[b, c0:c1], v[b, c0:c1], g[b, c0:c1], state, scale)
            outputs.append(o_c)
        finals.append(state)
    o = torch.cat(outputs, 0) if outputs else v.new_zeros(0, heads, dv)  # [B*T, H, dv]
    return o.reshape(batch, length, heads, dv), torch.stack(finals, 0)


def _gla_one_chunk(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One chunk of GLA. q, k, g: [C, H, dk]; v: [C, H, dv]; state: [H, dk, dv]."""
    c = q.shape[0]
    b = g.cumsum(0)  # [C, H, dk]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # [C, C]
    diff = (b[:, None] - b[None, :]).masked_fill(~causal[:, :, None, None], float("-inf"))  # [C, C, H, dk]
    scores = (q[:, None] * k[None] * diff.exp()).sum(-1)  # [C, C, H]
    o = torch.einsum("ijh,jhv->ihv", scores, v)  # [C, H, dv]
    o = o + torch.einsum("ihd,hdv->ihv", q * b.exp(), state)  # [C, H, dv]
    k_to_end = k * (b[-1:] - b).exp()  # [C, H, dk]
    state = b[-1].exp()[..., None] * state + torch.einsum("jhd,jhv->hdv", k_to_end, v)  # [H, dk, dv]
    return scale * o, state


def _prepare(features: SSEFeatures, router_logits: Tensor, top_k: int, scale: float | None,
             initial_state: Tensor | None, cu_seqlens: Tensor | None, routes: Tensor | None):
    """Shared validation of the public forms; returns (compute dtype, scale, router weights, router indices)."""
    batch, length, _, dk = features.q_shared.shape
    if router_logits.shape[:2] != (batch, length):
        raise ValueError(f"router_logits must be [B={batch}, T={length}, N], got {tuple(router_logits.shape)}")
    num_seqs = len(_sequence_bounds(batch, length, cu_seqlens))
    _check_state(initial_state, num_seqs, features.state_shape(router_logits.shape[-1]))
    _, weights, indices = sse_router(router_logits, top_k=top_k, routes=routes)
    return _compute_dtype(features.v), (dk ** -0.5 if scale is None else scale), weights, indices


def sse_recurrent(*, features: SSEFeatures, router_logits: Tensor, top_k: int, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None, routes: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The SSE recurrence token by token (the definition)."""
    dtype, scale, weights, indices = _prepare(features, router_logits, top_k, scale, initial_state, cu_seqlens, routes)
    batch, length, heads, dk = features.q_shared.shape
    n, dv = router_logits.shape[-1], features.v.shape[-1]
    qs, ks, qp, kp, vv, gs, gp = features.map(lambda x: x.to(dtype))
    weights = weights.to(dtype)
    outputs, finals = [], []
    for s, (b, start, end) in enumerate(_sequence_bounds(batch, length, cu_seqlens)):
        init = initial_state[s].to(dtype) if initial_state is not None else qs.new_zeros(n + 1, heads, dk, dv)
        states = list(init.unbind(0))  # N+1 x [H, dk, dv]; replaced, never written in place (autograd)
        for t in range(start, end):
            kv = vv[b, t][:, None, :]  # [H, 1, dv]
            states[0] = gs[b, t].exp()[..., None] * states[0] + ks[b, t][..., None] * kv
            o = torch.einsum("hd,hdv->hv", qs[b, t], states[0])  # [H, dv]
            for r in range(top_k):
                p, w = 1 + int(indices[b, t, r]), weights[b, t, r]
                states[p] = gp[b, t].exp()[..., None] * states[p] + (w * kp[b, t])[..., None] * kv
                o = o + torch.einsum("hd,hdv->hv", w * qp[b, t], states[p])
            outputs.append(scale * o)
        finals.append(torch.stack(states, 0))
    o = torch.stack(outputs, 0).reshape(batch, length, heads, dv).to(features.v.dtype)
    return o, (torch.stack(finals, 0).to(_final_dtype(initial_state, dtype)) if output_final_state else None)


def sse_chunk_varlen(*, features: SSEFeatures, router_logits: Tensor, top_k: int, scale: float | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     cu_seqlens: Tensor | None = None, routes: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """SSE as one chunked-GLA call over [shared stream || (sequence, partition)-sorted sparse stream]."""
    dtype, scale, weights, indices = _prepare(features, router_logits, top_k, scale, initial_state, cu_seqlens, routes)
    batch, length, heads, dk = features.q_shared.shape
    n, dv, total = router_logits.shape[-1], features.v.shape[-1], batch * length
    if cu_seqlens is None:
        cu_seqlens = torch.arange(batch + 1, device=features.v.device) * length
    num_seqs = cu_seqlens.numel() - 1
    qs, ks, qp, kp, vv, gs, gp = features.map(lambda x: x.to(dtype).flatten(0, 1))  # [L, H, d]
    # One row per (token, slot r): its token, sequence and partition; sort by (sequence, partition, time).
    token = torch.arange(total, device=vv.device).repeat_interleave(top_k)  # [L*K]
    seq = torch.searchsorted(cu_seqlens[1:].to(token), token, right=True)  # [L*K]
    part = indices.reshape(-1)  # [L*K]
    order = torch.argsort((seq * n + part) * total + token)  # [L*K]; keys are unique
    src, w = token[order], weights.reshape(-1).to(dtype)[order][:, None, None]  # [L*K], [L*K, 1, 1]
    seg_len = torch.bincount(seq * n + part, minlength=num_seqs * n)  # [S*N]; empty segments kept
    bounds = torch.cat([cu_seqlens.to(seg_len), total + seg_len.cumsum(0)])  # [S + S*N + 1]
    q = torch.cat([qs, w * qp[src]])[None]  # [1, L + L*K, H, dk]
    k = torch.cat([ks, w * kp[src]])[None]
    g = torch.cat([gs, gp[src]])[None]
    vals = torch.cat([vv, vv[src]])[None]  # [1, L + L*K, H, dv]
    h0 = None
    if initial_state is not None:
        init = initial_state.to(dtype)
        h0 = torch.cat([init[:, 0], init[:, 1:].reshape(num_seqs * n, heads, dk, dv)])  # [S + S*N, H, dk, dv]
    o, hT = gla_chunk(q, k, vals, g, scale=scale, initial_state=h0, cu_seqlens=bounds)
    o_sparse = o[0, total:][torch.argsort(order)].reshape(total, top_k, heads, dv).sum(1)  # [L, H, dv]
    o = (o[0, :total] + o_sparse).reshape(batch, length, heads, dv).to(features.v.dtype)
    if not output_final_state:
        return o, None
    final = torch.cat([hT[:num_seqs, None], hT[num_seqs:].reshape(num_seqs, n, heads, dk, dv)], 1)
    return o, final.to(_final_dtype(initial_state, dtype))  # final: [S, N+1, H, dk, dv]


def sse_mask(*, features: SSEFeatures, router_logits: Tensor, top_k: int, scale: float | None = None,
             initial_state: Tensor | None = None, output_final_state: bool = False,
             cu_seqlens: Tensor | None = None, routes: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """SSE as chunked GLA over (N+1)*H heads: partition p's heads see q*w, k*w, v and g masked to its tokens.

    An unselected token has k = 0 (no write) and g = 0 (no decay) in that partition. Costs (N+1)x the GLA compute
    but needs no sorting.
    """
    dtype, scale, weights, indices = _prepare(features, router_logits, top_k, scale, initial_state, cu_seqlens, routes)
    batch, length, heads = features.q_shared.shape[:3]
    n, dv = router_logits.shape[-1], features.v.shape[-1]
    zeros = torch.zeros(batch, length, n, dtype=dtype, device=features.v.device)
    gate = zeros.scatter(-1, indices, weights.to(dtype))[..., None, None]  # [B, T, N, 1, 1]; w_i or 0
    written = zeros.scatter(-1, indices, 1.0)[..., None, None]  # [B, T, N, 1, 1]; 1 where selected
    qs, ks, qp, kp, vv, gs, gp = features.map(lambda x: x.to(dtype))
    q = torch.cat([qs[:, :, None], gate * qp[:, :, None]], 2)  # [B, T, N+1, H, dk]
    k = torch.cat([ks[:, :, None], gate * kp[:, :, None]], 2)
    g = torch.cat([gs[:, :, None], written * gp[:, :, None]], 2)
    vals = vv[:, :, None].expand(batch, length, n + 1, heads, dv)  # [B, T, N+1, H, dv]
    q, k, g, vals = (x.reshape(batch, length, (n + 1) * heads, -1) for x in (q, k, g, vals))
    h0 = None if initial_state is None else initial_state.to(dtype).flatten(1, 2)  # [S, (N+1)*H, dk, dv]
    o, hT = gla_chunk(q, k, vals, g, scale=scale, initial_state=h0, cu_seqlens=cu_seqlens)
    o = o.reshape(batch, length, n + 1, heads, dv).sum(2).to(features.v.dtype)  # [B, T, H, dv]
    return o, (hT.unflatten(1, (n + 1, heads)).to(_final_dtype(initial_state, dtype)) if output_final_state else None)


def sse_decode(*, features: SSEFeatures, router_logits: Tensor, state: Tensor, slot_ids: Tensor, top_k: int,
               scale: float | None = None, out: Tensor | None = None) -> Tensor:
    """One decoding step per sequence, updating a slot-indexed state cache IN PLACE (the reference of
    `sse_rl.models.ops.sse_decode`, whose docstring has the arguments and shapes). A bf16 state is updated in fp32
    and rounded once on store; the read-out uses the fp32 value, as the Triton kernel does."""
    batch, heads, dk = features.q_shared.shape
    dv = features.v.shape[-1]
    want = features.state_shape(router_logits.shape[-1])
    if state.shape[1:] != want or state.dtype not in STATE_DTYPES:
        raise ValueError(f"state must be fp32, bf16 or fp64 [num_slots, {', '.join(map(str, want))}], got "
                         f"{state.dtype} {tuple(state.shape)}")
    scale = dk ** -0.5 if scale is None else scale
    rows = (slot_ids >= 0).nonzero().squeeze(-1)  # [b]
    slots = slot_ids[rows].long()  # [b]
    dtype = _compute_dtype(state)
    qs, ks, qp, kp, vv, gs, gp = features.map(lambda x: x[rows].to(dtype))
    _, weights, indices = sse_router(router_logits[rows], top_k=top_k)  # [b, K]
    kv = vv[:, :, None, :]  # [b, H, 1, dv]
    s0 = gs.exp()[..., None] * state[slots, 0].to(dtype) + ks[..., None] * kv  # [b, H, dk, dv]
    state[slots, 0] = s0.to(state.dtype)
    o = torch.einsum("bhd,bhdv->bhv", qs, s0)  # [b, H, dv]
    for r in range(top_k):
        p, w = 1 + indices[:, r], weights[:, r].to(dtype)[:, None, None]  # [b], [b, 1, 1]
        sp = gp.exp()[..., None] * state[slots, p].to(dtype) + (w * kp)[..., None] * kv  # [b, H, dk, dv]
        state[slots, p] = sp.to(state.dtype)
        o = o + torch.einsum("bhd,bhdv->bhv", w * qp, sp)
    result = features.v.new_zeros(batch, heads, dv)
    result[rows] = (scale * o).to(features.v.dtype)
    return result if out is None else out.copy_(result)
