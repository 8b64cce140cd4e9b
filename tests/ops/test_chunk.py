"""Chunked-GLA-over-segments kernels and the Triton SSE op against the PyTorch references (outputs, final states,
gradients of every input). CPU CI runs tiny shapes under TRITON_INTERPRET=1; a GPU runs the full sweep."""
import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, ON_GPU, assert_close, op_args
from sse_rl.models.ops import SSEFeatures
from sse_rl.models.ops.chunk import chunk_gla_segments, sse_triton
from sse_rl.models.ops.naive import gla_chunk, sse_chunk_varlen, sse_recurrent

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def sse_inputs(B, T, H, DK, DV, N, S, dtype):
    """Inputs shaped like the SSE layer makes them: silu/softmax features, logsigmoid/16 decays; a list of the
    SSEFeatures fields then the router logits (`op_args` makes keyword arguments of it), and an initial state."""
    x = lambda *shape: torch.randn(*shape, device=DEVICE)
    feats = [F.silu(x(B, T, H, DK)), x(B, T, H, DK).softmax(-1), F.silu(x(B, T, H, DK)), x(B, T, H, DK).softmax(-1),
             F.silu(x(B, T, H, DV)), F.logsigmoid(x(B, T, H, DK)) / 16, F.logsigmoid(x(B, T, H, DK)) / 16,
             x(B, T, N)]
    return [f.to(dtype) for f in feats], 0.1 * x(S, N + 1, H, DK, DV)


def grads(outputs, cotangents, inputs):
    loss = sum((o.float() * c).sum() for o, c in zip(outputs, cotangents))
    return torch.autograd.grad(loss, inputs)


# (B, T, H, DK, DV, N, K, cu_seqlens): T = 1, chunk multiples +-1, empty and one-token sequences, K up to N.
CPU_CASES = [
    (2, 1, 2, 16, 16, 4, 1, None),
    (2, 65, 2, 32, 16, 4, 1, None),
    (1, 70, 1, 16, 32, 4, 2, [0, 3, 3, 70]),
    (1, 50, 3, 24, 16, 6, 3, [0, 1, 10, 50]),
    (1, 129, 1, 80, 72, 2, 2, None),
    (1, 20, 1, 16, 16, 3, 3, None),
]
GPU_CASES = [
    (1, 63, 4, 64, 64, 4, 1, None),
    (2, 200, 2, 128, 128, 4, 2, None),
    (1, 300, 2, 256, 256, 4, 1, [0, 1, 64, 65, 300]),
    (3, 129, 1, 256, 128, 8, 2, None),
    (1, 1000, 1, 64, 64, 4, 1, [0, 500, 1000]),
]
CASES = CPU_CASES + (GPU_CASES if ON_GPU else [])


def case_id(c) -> str:
    B, T, H, DK, DV, N, K, cu = c
    return f"B{B}-T{T}-H{H}-dk{DK}-dv{DV}-N{N}-K{K}" + (f"-S{len(cu) - 1}" if cu else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sse_triton_matches_recurrent(case, dtype: torch.dtype) -> None:
    B, T, H, DK, DV, N, K, cu = case
    cu_t = torch.tensor(cu, device=DEVICE) if cu else None
    S = len(cu) - 1 if cu else B
    feats, h0 = sse_inputs(B, T, H, DK, DV, N, S, dtype)
    tri_in = [f.clone().requires_grad_() for f in feats] + [h0.clone().requires_grad_()]
    ref_in = [f.float().requires_grad_() for f in feats] + [h0.clone().requires_grad_()]
    kw = {"top_k": K, "output_final_state": True, "cu_seqlens": cu_t}
    o, ht = sse_triton(**op_args(tri_in[:-1]), initial_state=tri_in[-1], **kw)
    ro, rht = sse_recurrent(**op_args(ref_in[:-1]), initial_state=ref_in[-1], **kw)
    assert o.dtype == dtype and ht.dtype == torch.float32 and ht.shape == (S, N + 1, H, DK, DV)
    tol = TOL[dtype]
    assert_close("o", ro, o, tol)
    assert_close("final_state", rht, ht, tol)
    cot = [torch.randn_like(ro), torch.randn_like(rht)]
    names = ["q_shared", "k_shared", "q_sparse", "k_sparse", "v", "g_shared", "g_sparse", "router_logits", "h0"]
    for name, r, t in zip(names, grads([ro, rht], cot, ref_in), grads([o, ht], cot, tri_in)):
        assert_close(f"d{name}", r, t, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gla_segments_any_order_with_empty_segments(dtype: torch.dtype) -> None:
    """Segments in arbitrary state order, empty ones passing their state through, versus naive gla_chunk."""
    H, DK, DV = 2, 32 if not ON_GPU else 128, 48 if not ON_GPU else 256
    lens = [70, 0, 1, 64, 0, 33]
    bounds = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
    R, G = sum(lens), len(lens)
    q, v = torch.randn(1, R, H, DK, device=DEVICE), torch.randn(1, R, H, DV, device=DEVICE)
    k = torch.randn(1, R, H, DK, device=DEVICE).softmax(-1)
    g = F.logsigmoid(torch.randn(1, R, H, DK, device=DEVICE)) / 8
    h0 = torch.randn(G, H, DK, DV, device=DEVICE)
    ref_in = [x.requires_grad_() for x in (q, k, v, g, h0)]
    tri_in = [x.detach().to(dtype).requires_grad_() for x in (q[0], k[0], v[0], g[0])] + [h0.detach().clone()]
    tri_in[-1].requires_grad_()
    order = torch.randperm(G, device=DEVICE)  # kernel state row i <- segment order[i]
    o, ht = chunk_gla_segments(*tri_in[:4], bounds[:-1][order].int(), bounds.diff()[order].int(), scale=0.2,
                               initial_state=tri_in[4][order], output_final_state=True)
    ro, rht = gla_chunk(*ref_in[:4], scale=0.2, initial_state=ref_in[4], cu_seqlens=bounds)
    tol = TOL[dtype]
    assert_close("o", ro[0], o, tol)
    assert_close("final_state", rht[order], ht, tol)
    assert torch.equal(ht[order.argsort()][1], h0[1]) and torch.equal(ht[order.argsort()][4], h0[4])
    cot = [torch.randn_like(ro[0]), torch.randn_like(rht[order])]
    ref_g = grads([ro[0], rht[order]], cot, ref_in)
    tri_g = grads([o, ht], cot, tri_in)
    for name, r, t in zip("qkvgh", ref_g, tri_g):
        assert_close(f"d{name}", r.squeeze(0), t, tol)


def test_sse_triton_grads_through_a_broadcast_final_state_gradient() -> None:
    """`final_state.sum()` hands the backward an expanded (stride-0) gradient: the kernels read it as it is laid
    out, so the gradients match the reference's and stay finite."""
    feats, h0 = sse_inputs(1, 70, 2, 16, 32, 4, 1, torch.float32)
    tri_in, ref_in = ([f.clone().requires_grad_() for f in feats] for _ in range(2))
    kw = {"top_k": 2, "initial_state": h0, "output_final_state": True}
    _, ht = sse_triton(**op_args(tri_in), **kw)
    _, rht = sse_recurrent(**op_args(ref_in), **kw)
    # The queries do not reach the state: k_shared, k_sparse, v, g_shared, g_sparse and the router logits do.
    reach = [1, 3, 4, 5, 6, 7]
    ref_grads = torch.autograd.grad(rht.sum(), [ref_in[i] for i in reach])
    tri_grads = torch.autograd.grad(ht.sum(), [tri_in[i] for i in reach])
    for i, r, t in zip(reach, ref_grads, tri_grads):
        assert_close(f"d{(*SSEFeatures._fields, 'router_logits')[i]}", r, t, 1e-4)


def test_sse_triton_is_deterministic_and_final_state_optional() -> None:
    feats, _ = sse_inputs(1, 90, 2, 16, 16, 4, 1, torch.float32)
    inputs = [f.requires_grad_() for f in feats]
    runs = []
    for _ in range(2):
        o, ht = sse_triton(**op_args(inputs), top_k=2)
        runs.append((o, *torch.autograd.grad(o.square().sum(), inputs)))
    assert ht is None
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("change,match", [
    ({"v": (1, 8, 3, 16)}, "v must be"),
    ({"cu": [0, 3, 9]}, "cu_seqlens must rise"),
    ({"B": 2, "cu": [0, 8]}, "batch size must be 1"),
    ({"top_k": 5}, "top_k"),
    ({"h0_dtype": torch.float16}, "initial_state must be fp32 or bf16"),
    ({"v": (1, 8, 2, 16), "v_dtype": torch.float64}, "share one dtype"),
])
def test_sse_triton_rejects_bad_inputs(change: dict, match: str) -> None:
    B = change.get("B", 1)
    feats, h0 = sse_inputs(B, 8, 2, 16, 16, 4, 1, torch.float32)
    if "v" in change:
        feats[4] = torch.randn(*change["v"], device=DEVICE, dtype=change.get("v_dtype", torch.float32))
    cu = torch.tensor(change["cu"]) if "cu" in change else None
    with pytest.raises(ValueError, match=match):
        sse_triton(**op_args(feats), top_k=change.get("top_k", 1), cu_seqlens=cu,
                   initial_state=h0.to(change.get("h0_dtype", torch.float32)))


def test_dispatcher_matches_recurrent() -> None:
    """`sse_rl.models.ops.sse_chunk` runs the Triton op on CUDA and the PyTorch reference elsewhere; either way it
    equals the recurrence."""
    from sse_rl.models.ops import sse_chunk

    feats, h0 = sse_inputs(2, 40, 2, 32, 32, 4, 2, torch.float32)
    o, ht = sse_chunk(**op_args(feats), top_k=1, initial_state=h0, output_final_state=True)
    ro, rht = sse_recurrent(**op_args(feats), top_k=1, initial_state=h0, output_final_state=True)
    assert_close("o", ro, o, 1e-4)
    assert_close("final_state", rht, ht, 1e-4)


def test_sse_triton_takes_fp32_gates_beside_16bit_inputs() -> None:
    """The model computes log-decay gates in fp32 next to 16-bit q/k/v: the op accepts that mix, returns v's dtype
    and fp32 gate gradients, and matches the fp32 recurrence."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    feats, h0 = sse_inputs(1, 70, 2, 32, 32, 4, 1, torch.float32)
    tri_in = [f.to(dtype) if i not in (5, 6) else f for i, f in enumerate(feats)]
    tri_in = [f.clone().requires_grad_() for f in tri_in]
    o, ht = sse_triton(**op_args(tri_in), top_k=1, initial_state=h0, output_final_state=True)
    ro, rht = sse_recurrent(**op_args([f.float() for f in tri_in]), top_k=1, initial_state=h0,
                            output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close("o", ro, o.float(), 2e-2)
    assert_close("final_state", rht, ht, 2e-2)
    o.float().sum().backward()
    assert tri_in[5].grad.dtype == torch.float32 and tri_in[0].grad.dtype == dtype


def model_like_inputs(lengths, H, DK, DV, N, dtype):
    """Inputs as an SSE-H layer at init makes them under bf16 autocast: small silu features, softmax keys of size
    ~1/dk, fp32 log-decays near logsigmoid(0)/16, many short packed sequences (so short sparse segments that start
    anywhere in the stream). Returns the features, cu_seqlens and a cotangent of the model's tiny scale (~1e-4)."""
    T = sum(lengths)
    x = lambda *shape: torch.randn(1, T, *shape, device=DEVICE)
    feats = [F.silu(0.4 * x(H, DK)), (0.1 * x(H, DK)).softmax(-1), F.silu(0.4 * x(H, DK)),
             (0.1 * x(H, DK)).softmax(-1), F.silu(0.4 * x(H, DV))]
    gates = [F.logsigmoid(0.3 * x(H, DK)) / 16 for _ in range(2)]
    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    return [f.to(dtype) for f in feats] + gates + [(0.1 * x(N)).to(dtype)], cu, 1e-4 * x(H, DV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sse_triton_grads_on_model_like_inputs(dtype: torch.dtype) -> None:
    """Gradients (values, not only dtypes) with fp32 gates beside q/k/v of `dtype`, on the distribution the model
    feeds the op; the GPU sweep runs it at the model's head size in bf16."""
    lengths = [20, 130, 64, 1, 75, 33, 128, 90] if ON_GPU else [20, 45, 1, 34]
    H, DK, DV, N, K = (6, 128, 128, 4, 1) if ON_GPU else (1, 32, 32, 4, 1)
    feats, cu, do = model_like_inputs(lengths, H, DK, DV, N, dtype)
    tri_in = [f.clone().requires_grad_() for f in feats]
    ref_in = [f.float().requires_grad_() for f in feats]
    o = sse_triton(**op_args(tri_in), top_k=K, cu_seqlens=cu)[0]
    ro = sse_chunk_varlen(**op_args(ref_in), top_k=K, cu_seqlens=cu)[0]
    assert_close("o", ro, o.float(), TOL[dtype])
    names = ["q_shared", "k_shared", "q_sparse", "k_sparse", "v", "g_shared", "g_sparse", "router_logits"]
    for name, r, t in zip(names, grads([ro], [do], ref_in), grads([o], [do], tri_in)):
        assert t.dtype == (torch.float32 if name.startswith("g_") else dtype), name
        assert_close(f"d{name}", r, t, TOL[dtype])
