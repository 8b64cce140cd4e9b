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


def test_stream_maps_are_adjoint_and_weighted() -> None:
    """The backward of to_stream is from_stream's gather (split into the shared and the sparse part) and vice
    versa, and the weight gradient of to_stream is <d(row), row> per pair."""
    L, N, K, H = 23, 5, 2, 3
    r = sort_by_partition(distinct_partitions(L, N, K), torch.tensor([0, 9, L], device=DEVICE), N)
    f64 = {"device": DEVICE, "dtype": torch.float64}
    shared, sparse = torch.randn(L, H, **f64, requires_grad=True), torch.randn(L, H, **f64, requires_grad=True)
    y = torch.randn(L * (1 + K), H, **f64, requires_grad=True)
    x = to_stream(shared, sparse, r)                                      # [L*(1+K), H]
    fy = from_stream(y, r)                                                # [L, H]
    assert torch.equal(x[:L], shared) and torch.equal(x[L:], sparse[r.src])
    torch.testing.assert_close(fy, y[:L] + y[L:][r.inv].view(L, K, H).sum(1))
    dsh, dsp = torch.autograd.grad(x, (shared, sparse), y)
    torch.testing.assert_close(dsh, y[:L])
    torch.testing.assert_close(dsp, fy - y[:L])
    (dy,) = torch.autograd.grad(fy, y, shared)
    torch.testing.assert_close(dy, to_stream(shared, shared, r))
    w = torch.rand(L, K, **f64, requires_grad=True)
    xw = to_stream(shared, sparse, r, w)
    torch.testing.assert_close(xw[L:], sparse[r.src] * w.flatten()[r.perm][:, None])
    (dw,) = torch.autograd.grad(xw, w, y)
    torch.testing.assert_close(dw, (y[L:] * sparse[r.src]).sum(1)[r.inv].view(L, K))
