"""Fused router kernel against the PyTorch reference: probs, top-K weights/indices, tie order, gradients."""
import pytest
import torch
from kernel_testing import DEVICE, assert_close
from sse_rl.models.ops.naive import sse_router as router_ref
from sse_rl.models.ops.router import fused_router

CASES = [(1, 4, 1), (37, 4, 1), (37, 4, 2), (70, 7, 3), (5, 1, 1), (33, 16, 4)]


@pytest.mark.parametrize("M,N,K", CASES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_matches_reference(M: int, N: int, K: int, dtype: torch.dtype) -> None:
    logits = torch.randn(M, N, device=DEVICE).to(dtype).requires_grad_()
    probs, w, idx = fused_router(logits, top_k=K)
    rprobs, rw, ridx = router_ref(logits, top_k=K)
    assert probs.dtype == w.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx, ridx)
    assert_close("probs", rprobs, probs, 1e-6)
    assert_close("weights", rw, w, 1e-6)
    dprobs, dw = torch.randn_like(probs), torch.randn_like(w)
    (grad,) = torch.autograd.grad((probs * dprobs).sum() + (w * dw).sum(), logits)
    (rgrad,) = torch.autograd.grad((rprobs * dprobs).sum() + (rw * dw).sum(), logits)
    assert grad.dtype == dtype
    assert_close("dlogits", rgrad, grad, 1e-5 if dtype == torch.float32 else 1e-2)


def test_router_ties_go_to_lower_index_and_weights_are_not_renormalised() -> None:
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0], [2.0, 0.0, 2.0, -1.0]], device=DEVICE)
    probs, w, idx = fused_router(logits, top_k=2)
    assert idx.tolist() == [[1, 2], [0, 2]]
    torch.testing.assert_close(w, probs.gather(1, idx))
    assert (w.sum(-1) < 1).all()


def test_router_weights_only_gradient() -> None:
    logits = torch.randn(9, 5, device=DEVICE, requires_grad=True)
    _, w, _ = fused_router(logits, top_k=2)
    (grad,) = torch.autograd.grad(w.sum(), logits)
    _, rw, _ = router_ref(logits, top_k=2)
    (rgrad,) = torch.autograd.grad(rw.sum(), logits)
    assert_close("dlogits", rgrad, grad, 1e-5)


@pytest.mark.parametrize("top_k", [0, 5])
def test_router_rejects_bad_top_k(top_k: int) -> None:
    with pytest.raises(ValueError, match="top_k"):
        fused_router(torch.randn(3, 4, device=DEVICE), top_k=top_k)
