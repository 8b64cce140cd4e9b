"""The PyTorch references of the SSE op agree with each other and with the definition (docs/sse_layer.md)."""
from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from sse_rl.models.ops import SSEFeatures, naive

FORMS = {"chunk_varlen": naive.sse_chunk_varlen, "mask": naive.sse_mask}
TOL = 1e-10


def make_inputs(batch: int, length: int, n: int, heads: int = 2, dk: int = 8, dv: int = 6,
                decay: float = 1.0) -> dict[str, SSEFeatures | torch.Tensor]:
    """The op's feature and router arguments, fp64, as the mixer makes them (q silu, k softmax,
    g = decay * logsigmoid / 16)."""
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float64)
    features = SSEFeatures(
        q_shared=F.silu(r(batch, length, heads, dk)), k_shared=r(batch, length, heads, dk).softmax(-1),
        q_sparse=F.silu(r(batch, length, heads, dk)), k_sparse=r(batch, length, heads, dk).softmax(-1),
        v=F.silu(r(batch, length, heads, dv)),
        g_shared=decay * F.logsigmoid(r(batch, length, heads, dk)) / 16,
        g_sparse=decay * F.logsigmoid(r(batch, length, heads, dk)) / 16,
    )
    return {"features": features, "router_logits": 2 * r(batch, length, n)}


def rows(x: dict[str, SSEFeatures | torch.Tensor], select) -> dict[str, SSEFeatures | torch.Tensor]:
    """The op's arguments `x` with `select` applied to every tensor (the features and the router logits)."""
    return {"features": x["features"].map(select), "router_logits": select(x["router_logits"])}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("length", [1, 37, 130], ids=lambda t: f"T{t}")
@pytest.mark.parametrize(("top_k", "n"), [(1, 2), (1, 4), (2, 4)], ids=["k1n2", "k1n4", "k2n4"])
def test_forms_agree_batched(top_k: int, n: int, length: int) -> None:
    x = make_inputs(2, length, n)
    h0 = torch.randn(2, n + 1, 2, 8, 6, dtype=torch.float64)
    ref_o, ref_h = naive.sse_recurrent(**x, top_k=top_k, initial_state=h0, output_final_state=True)
    for name, form in FORMS.items():
        o, h = form(**x, top_k=top_k, initial_state=h0, output_final_state=True)
        assert max_diff(o, ref_o) < TOL, name
        assert max_diff(h, ref_h) < TOL, name
        assert h.shape == (2, n + 1, 2, 8, 6)


@pytest.mark.parametrize(("top_k", "n"), [(1, 4), (2, 2)], ids=["k1n4", "k2n2"])
def test_forms_agree_packed_and_match_each_sequence_alone(top_k: int, n: int) -> None:
    bounds = [0, 1, 66, 66, 101]  # lengths 1, 65 (crosses a chunk), 0, 35
    x = make_inputs(1, bounds[-1], n)
    h0 = torch.randn(4, n + 1, 2, 8, 6, dtype=torch.float64)
    cu = torch.tensor(bounds)
    ref_o, ref_h = naive.sse_recurrent(**x, top_k=top_k, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for name, form in FORMS.items():
        o, h = form(**x, top_k=top_k, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        assert max_diff(o, ref_o) < TOL, name
        assert max_diff(h, ref_h) < TOL, name
    for s, (a, b) in enumerate(pairwise(bounds)):
        alone = rows(x, lambda t, a=a, b=b: t[:, a:b])
        o, h = naive.sse_chunk_varlen(**alone, top_k=top_k, initial_state=h0[s:s + 1], output_final_state=True)
        assert max_diff(o, ref_o[:, a:b]) < TOL if b > a else o.numel() == 0
        assert max_diff(h[0], ref_h[s]) < TOL
    assert torch.equal(ref_h[2], h0[2]), "an empty sequence must pass its initial state through"


def test_gradients_agree_and_reach_the_router() -> None:
    x = make_inputs(1, 70, 4)
    h0 = torch.randn(1, 5, 2, 8, 6, dtype=torch.float64)
    weights_o = torch.randn(1, 70, 2, 6, dtype=torch.float64)
    weights_h = torch.randn(1, 5, 2, 8, 6, dtype=torch.float64)
    grads = {}
    for name, form in {"recurrent": naive.sse_recurrent, **FORMS}.items():
        leaves = {**x["features"]._asdict(), "router_logits": x["router_logits"], "initial_state": h0}
        leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        features = SSEFeatures(*(leaves[k] for k in SSEFeatures._fields))
        o, h = form(features=features, router_logits=leaves["router_logits"], initial_state=leaves["initial_state"],
                    top_k=2, output_final_state=True)
        ((o * weights_o).sum() + (h * weights_h).sum()).backward()
        grads[name] = {k: v.grad for k, v in leaves.items()}
    for name in FORMS:
        for key, ref in grads["recurrent"].items():
            assert max_diff(grads[name][key], ref) < TOL, (name, key)
    assert grads["recurrent"]["router_logits"].abs().max() > 1e-3, "the router learns through the q/k scaling"


def test_strong_decay_stays_finite() -> None:
    x = make_inputs(1, 100, 4, decay=400.0)  # log-decays down to about -25 per step
    ref_o, ref_h = naive.sse_recurrent(**x, top_k=1, output_final_state=True)
    o, h = naive.sse_chunk_varlen(**x, top_k=1, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(h).all()
    assert max_diff(o, ref_o) < TOL and max_diff(h, ref_h) < TOL


def test_unselected_partitions_are_neither_written_nor_decayed() -> None:
    x = make_inputs(1, 20, 4)
    x["router_logits"] = torch.tensor([0.0, 9.0, 0.0, 0.0], dtype=torch.float64).expand(1, 20, 4)  # always pick 1
    h0 = torch.randn(1, 5, 2, 8, 6, dtype=torch.float64)
    for form in (naive.sse_recurrent, *FORMS.values()):
        _, h = form(**x, top_k=1, initial_state=h0, output_final_state=True)
        assert torch.equal(h[:, [1, 3, 4]], h0[:, [1, 3, 4]])  # partitions 1 + {0, 2, 3}
        assert max_diff(h[:, 2], h0[:, 2]) > 1e-3


@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_steps_match_recurrent(top_k: int) -> None:
    x = make_inputs(1, 12, 4)
    h0 = torch.randn(1, 5, 2, 8, 6, dtype=torch.float64)
    ref_o, ref_h = naive.sse_recurrent(**x, top_k=top_k, initial_state=h0, output_final_state=True)
    state = torch.randn(3, 5, 2, 8, 6, dtype=torch.float64)
    state[2] = h0[0]
    untouched = state[:2].clone()
    slots = torch.tensor([2, -1])  # row 1 is padding
    for t in range(12):
        step = rows(x, lambda v, t=t: torch.cat([v[:, t], torch.randn_like(v[:, t])]))  # [2, ...]
        o = naive.sse_decode(**step, state=state, slot_ids=slots, top_k=top_k)
        assert max_diff(o[0], ref_o[0, t]) < TOL
        assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert max_diff(state[2], ref_h[0]) < TOL
    assert torch.equal(state[:2], untouched)


def test_router_ties_go_to_the_lower_index_and_weights_are_not_renormalised() -> None:
    probs, weights, indices = naive.sse_router(torch.zeros(3, 4), top_k=2)
    assert indices.tolist() == [[0, 1]] * 3
    assert torch.allclose(weights, torch.full((3, 2), 0.25))
    assert probs.dtype == torch.float32
    _, _, indices = naive.sse_router(torch.tensor([[0.0, 1.0, 1.0, 0.5]], dtype=torch.bfloat16), top_k=2)
    assert indices.tolist() == [[1, 2]]


def test_aux_loss_matches_hand_computation() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    _, _, indices = naive.sse_router(probs.log(), top_k=1)  # top-1: 0, 0, 1
    # p = (0.6, 0.4), f = (2/3, 1/3): (N/K) * sum p_i f_i = 2 * (0.4 + 0.4/3)
    assert math.isclose(naive.sse_aux_loss(probs, indices).item(), 2 * (0.6 * 2 / 3 + 0.4 / 3), rel_tol=1e-6)
    # without the last token: p = (0.75, 0.25), f = (1, 0)
    mask = torch.tensor([True, True, False])
    assert math.isclose(naive.sse_aux_loss(probs, indices, mask).item(), 2 * 0.75, rel_tol=1e-6)


def test_bad_inputs_raise_with_the_name() -> None:
    x = make_inputs(2, 5, 4)
    with pytest.raises(ValueError, match="top_k"):
        naive.sse_chunk_varlen(**x, top_k=5)
    with pytest.raises(ValueError, match="batch size must be 1"):
        naive.sse_chunk_varlen(**x, top_k=1, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="initial_state"):
        naive.sse_mask(**x, top_k=1, initial_state=torch.zeros(2, 4, 2, 8, 6, dtype=torch.float64))
    one = rows(x, lambda t: t[:1])
    with pytest.raises(ValueError, match="cu_seqlens"):
        naive.sse_recurrent(**one, top_k=1, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="state must be"):
        step = rows(x, lambda t: t[:, 0])
        naive.sse_decode(**step, state=torch.zeros(2, 4, 2, 8, 6), slot_ids=torch.tensor([0, 1]), top_k=1)
