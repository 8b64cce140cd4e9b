"""Counting-sort routing: the (sequence, partition, time) order, segment table and the two-way gathers."""
import pytest
import torch
from kernel_testing import DEVICE
from sse_rl.models.ops.routing import from_stream, sort_by_partition, to_stream


def distinct_partitions(L: int, N: int, K: int) -> torch.Tensor:
    return torch.rand(L, N, device=DEVICE).argsort(-1)[:, :K]  # [L, K]


@pytest.mark.parametrize("cu,N,K", [([0, 1], 4, 1), ([0, 37, 37, 50], 4, 2), ([0, 5, 200, 201], 7, 3)])
def test_sort_matches_argsort_order(cu: list[int], N: int, K: int) -> None:
    L = cu[-1]
    idx = distinct_partitions(L, N, K)
    cu_t = torch.tensor(cu, device=DEVICE)
    r = sort_by_partition(idx, cu_t, N)
    tok = torch.arange(L, device=DEVICE).repeat_interleave(K)
    seq = torch.searchsorted(cu_t[1:], tok, right=True)
    key = (seq * N + idx.flatten()) * L + tok  # unique keys
    assert torch.equal(r.perm, torch.argsort(key))
    assert torch.equal(r.perm[r.inv], torch.arange(L * K, device=DEVICE))
    counts = torch.zeros(len(cu) - 1, N, dtype=torch.long, device=DEVICE).index_put_(
        (seq, idx.flatten()), torch.ones_like(tok), accumulate=True)
    S = len(cu) - 1
    seg_len = r.seg_len.view(S, N + 1).long()
    assert torch.equal(seg_len[:, 0], cu_t.diff())
    assert torch.equal(seg_len[:, 1:], counts)
    # Sparse segments tile [L, L + L*K) in (sequence, partition) order; shared ones are the sequences.
    start = r.seg_start.view(S, N + 1).long()
    assert torch.equal(start[:, 0], cu_t[:-1])
    ends = (start[:, 1:] + seg_len[:, 1:]).flatten()
    assert torch.equal(start[:, 1:].flatten()[1:], ends[:-1]) and start[0, 1] == L and ends[-1] == L + L * K
    # Every sorted row of segment (s, 1+p) holds a pair of sequence s routed to p.
    row_seg = torch.searchsorted(ends, torch.arange(L, L + L * K, device=DEVICE), right=True)
    assert torch.equal(row_seg, (seq * N + idx.flatten())[r.perm])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_maps_are_adjoint_and_weighted(dtype: torch.dtype) -> None:
    """The backward of to_stream is from_stream's gather (split into the shared and the sparse part) and vice
    versa, and the weight gradient of to_stream is <d(row), row> per pair (sums and products in fp32)."""
    L, N, K, H, D = 23, 5, 2, 3, 40  # H * D = 120 columns: a partial column tile
    r = sort_by_partition(distinct_partitions(L, N, K), torch.tensor([0, 9, L], device=DEVICE), N)
    src = r.perm // K
    opts = {"device": DEVICE, "dtype": dtype}
    shared, sparse = torch.randn(L, H, D, **opts, requires_grad=True), torch.randn(L, H, D, **opts, requires_grad=True)
    y = torch.randn(L * (1 + K), H, D, **opts, requires_grad=True)
    x = to_stream(shared, sparse, r)                                      # [L*(1+K), H, D]
    fy = from_stream(y, r)                                                # [L, H, D]
    assert torch.equal(x[:L], shared) and torch.equal(x[L:], sparse[src])
    torch.testing.assert_close(fy, (y[:L].float() + y[L:][r.inv].float().view(L, K, H, D).sum(1)).to(dtype))
    dsh, dsp = torch.autograd.grad(x, (shared, sparse), y)
    torch.testing.assert_close(dsh, y[:L])
    torch.testing.assert_close(dsp, y[L:][r.inv].float().view(L, K, H, D).sum(1).to(dtype))
    (dy,) = torch.autograd.grad(fy, y, shared)
    assert torch.equal(dy, to_stream(shared, shared, r))
    w = torch.rand(L, K, device=DEVICE, requires_grad=True)
    xw = to_stream(shared, sparse, r, w)
    wf = w.flatten()[r.perm][:, None, None]
    torch.testing.assert_close(xw[L:], (sparse[src].float() * wf).to(dtype))
    dw, dsp = torch.autograd.grad(xw, (w, sparse), y)
    torch.testing.assert_close(dw, (y[L:].float() * sparse[src].float()).sum((1, 2))[r.inv].view(L, K))
    torch.testing.assert_close(dsp, (y[L:].float() * wf)[r.inv].view(L, K, H, D).sum(1).to(dtype))
