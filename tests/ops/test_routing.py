"""Counting-sort routing: the (sequence, partition, time) order, segment table and the two-way gathers."""
import pytest
import torch
from kernel_testing import DEVICE
from sse_rl.models.ops.routing import gather_pairs, scatter_pairs, sort_by_partition


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


def test_gathers_are_adjoint_and_deterministic() -> None:
    L, N, K, H = 23, 5, 2, 3
    r = sort_by_partition(distinct_partitions(L, N, K), torch.tensor([0, 9, L], device=DEVICE), N)
    x = torch.randn(L, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    y = torch.randn(L * K, H, device=DEVICE, dtype=torch.float64, requires_grad=True)
    gx = gather_pairs(x, r, per_token=True)   # [L*K, H]
    sy = scatter_pairs(y, r)                  # [L, H]
    # <gather(x), y> == <x, scatter(y)>, and each backward is the other map.
    torch.testing.assert_close((gx * y).sum(), (x * sy).sum())
    (dx,) = torch.autograd.grad(gx, x, y)
    torch.testing.assert_close(dx, sy)
    (dy,) = torch.autograd.grad(sy, y, x)
    torch.testing.assert_close(dy, gx)
    w = torch.randn(L * K, device=DEVICE)
    torch.testing.assert_close(gather_pairs(w, r, per_token=False), w[r.perm])
