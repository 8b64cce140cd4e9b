"""Routing replay (issue #28): the SSE layers use given partitions instead of their own top-K, with the router's
probabilities at those partitions as weights, and return the partitions they used.

The ops (the PyTorch forms and the Triton op, on CPU under TRITON_INTERPRET=1) take forced `routes`; the HF model
replays `routes` [B, T, num SSE layers, K] and returns `output_routes`.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sse_rl.models import SSEHConfig, SSEHForCausalLM
from sse_rl.models.layers import NO_ROUTE
from sse_rl.models.ops import SSEFeatures, sse_router
from sse_rl.models.ops.naive import sse_chunk_varlen, sse_mask, sse_recurrent

VOCAB = 512


@pytest.fixture(scope="module")
def model() -> SSEHForCausalLM:
    torch.manual_seed(0)
    return SSEHForCausalLM(SSEHConfig.from_preset("sse-h-tiny")).eval()


@pytest.fixture(scope="module")
def model_k2() -> SSEHForCausalLM:
    torch.manual_seed(0)
    return SSEHForCausalLM(SSEHConfig.from_preset("sse-h-tiny", num_writer=2, num_reader=2)).eval()


def other_routes(routes: torch.Tensor, n: int) -> torch.Tensor:
    """Every token's partitions shifted by one (mod N): different from `routes` everywhere, still distinct."""
    return ((routes.long() + 1) % n).to(routes.dtype)


def op_inputs(B: int, T: int, H: int, dk: int, dv: int, N: int) -> tuple[SSEFeatures, torch.Tensor]:
    x = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    feats = SSEFeatures(F.silu(x(B, T, H, dk)), x(B, T, H, dk).softmax(-1), F.silu(x(B, T, H, dk)),
                        x(B, T, H, dk).softmax(-1), F.silu(x(B, T, H, dv)), F.logsigmoid(x(B, T, H, dk)) / 16,
                        F.logsigmoid(x(B, T, H, dk)) / 16)
    return feats, x(B, T, N)


def random_routes(lead: tuple[int, ...], n: int, k: int) -> torch.Tensor:
    """K distinct partitions per token, uniformly at random."""
    return torch.rand(*lead, n).argsort(-1)[..., :k]


@pytest.mark.parametrize("k", [1, 2], ids=["K1", "K2"])
def test_router_weights_are_the_probs_at_the_forced_partitions(k: int) -> None:
    logits = torch.randn(3, 5, 4)
    routes = random_routes((3, 5), 4, k)
    probs, weights, indices = sse_router(logits, top_k=k, routes=routes)
    assert torch.equal(indices, routes)
    assert torch.equal(weights, logits.softmax(-1).gather(-1, routes))
    own = sse_router(logits, top_k=k)
    assert torch.equal(sse_router(logits, top_k=k, routes=own[2])[1], own[1])


@pytest.mark.parametrize("form", [sse_recurrent, sse_chunk_varlen, sse_mask], ids=lambda f: f.__name__)
def test_reference_forms_agree_on_forced_routes(form) -> None:
    feats, logits = op_inputs(1, 40, 2, 8, 8, 4)
    cu = torch.tensor([0, 7, 7, 40])
    routes = random_routes((1, 40), 4, 2)
    h0 = 0.1 * torch.randn(3, 5, 2, 8, 8, dtype=torch.float64)
    ref = sse_recurrent(features=feats, router_logits=logits, top_k=2, initial_state=h0, output_final_state=True,
                        cu_seqlens=cu, routes=routes)
    out = form(features=feats, router_logits=logits, top_k=2, initial_state=h0, output_final_state=True,
               cu_seqlens=cu, routes=routes)
    for name, a, b in zip(("o", "final_state"), ref, out):
        assert (a - b).abs().max() < 1e-10, name
    own = form(features=feats, router_logits=logits, top_k=2, cu_seqlens=cu)[0]
    assert not torch.allclose(own, out[0]), "forced routes differ from the top-2, so must the output"


def test_triton_op_takes_forced_routes() -> None:
    """The Triton op (interpreted on CPU) with forced routes matches the reference: output, final state and the
    gradients of every input, the router logits included (through the replayed weights)."""
    from sse_rl.models.ops.chunk import sse_triton

    torch.manual_seed(0)
    feats, logits = op_inputs(1, 70, 1, 16, 16, 4)
    feats, logits = feats.map(lambda f: f.float().requires_grad_()), logits.float().requires_grad_()
    cu = torch.tensor([0, 3, 3, 70])
    routes = random_routes((1, 70), 4, 2).to(torch.uint8)
    results = []
    for impl in (sse_chunk_varlen, sse_triton):
        o, ht = impl(features=feats, router_logits=logits, top_k=2, output_final_state=True, cu_seqlens=cu,
                     routes=routes)
        loss = (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() + (ht * 0.3).sum()
        results.append((o, ht, *torch.autograd.grad(loss, [*feats, logits])))
    for i, (ref, out) in enumerate(zip(*results)):
        err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        assert err < 1e-4, f"result {i}: relative error {err:.2e}"
    assert results[0][-1].abs().max() > 0, "the router logits get a gradient through the replayed weights"


def test_replaying_own_routes_changes_nothing(model: SSEHForCausalLM) -> None:
    x = torch.randint(0, VOCAB, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        own = model(x, attention_mask=mask, output_routes=True)
        replay = model(x, attention_mask=mask, routes=own.routes, output_routes=True)
    assert own.routes.shape == (2, 70, 3, 1) and own.routes.dtype == torch.uint8
    assert torch.equal(replay.routes, own.routes)
    assert (replay.logits - own.logits).abs().max() < 1e-6


def test_own_routes_are_the_routers_top_k(model_k2: SSEHForCausalLM) -> None:
    x = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        out = model_k2(x, output_routes=True, output_hidden_states=True)
    sse = [i for i, kind in enumerate(model_k2.config.layer_types) if kind != "full_attention"]
    for j, i in enumerate(sse):
        layer = model_k2.model.layers[i]
        logits = layer.attn.e_proj(layer.attn_norm(out.hidden_states[i]))
        assert torch.equal(out.routes[:, :, j].long(), sse_router(logits, top_k=2)[2]), f"layer {i}"


@pytest.mark.parametrize("k", [1, 2], ids=["K1", "K2"])
def test_replay_uses_given_routes(model: SSEHForCausalLM, model_k2: SSEHForCausalLM, k: int) -> None:
    m = model if k == 1 else model_k2
    x = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        own = m(x, output_routes=True)
        given = other_routes(own.routes, m.config.num_sparse_partition)
        replay = m(x, routes=given, output_routes=True)
    assert torch.equal(replay.routes, given)
    assert (replay.logits - own.logits).abs().max() > 1e-3


def test_unrecorded_tokens_keep_their_own_choice(model: SSEHForCausalLM) -> None:
    """NO_ROUTE marks tokens the engine did not record (prefix-cache hits, the last token)."""
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        own = model(x, output_routes=True)
        given = other_routes(own.routes, 4)
        given[:, 10:] = NO_ROUTE
        replay = model(x, routes=given, output_routes=True)
        assert torch.equal(model(x, routes=torch.full_like(given, NO_ROUTE)).logits, own.logits)
    assert torch.equal(replay.routes[:, :10], given[:, :10])
    assert (replay.routes != NO_ROUTE).all()


def test_packed_replay_equals_each_sequence_alone(model: SSEHForCausalLM) -> None:
    lengths = [7, 1, 70]
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    with torch.no_grad():
        alone = [model(s, output_routes=True) for s in seqs]
        given = [other_routes(a.routes, 4) for a in alone]
        replay_alone = [model(s, routes=r).logits[0] for s, r in zip(seqs, given)]
        cu = torch.tensor([0, 7, 8, 78])
        packed = model(torch.cat(seqs, 1), cu_seqlens=cu, routes=torch.cat(given, 1), output_routes=True)
        own_packed = model(torch.cat(seqs, 1), cu_seqlens=cu, output_routes=True)
    assert torch.equal(packed.routes, torch.cat(given, 1))
    assert torch.equal(own_packed.routes, torch.cat([a.routes for a in alone], 1))
    for i, ref in enumerate(replay_alone):
        got = packed.logits[0, int(cu[i]):int(cu[i + 1])]
        assert (got - ref).abs().max() < 1e-5, f"sequence {i}"


def test_padded_replay_equals_packed_replay(model: SSEHForCausalLM) -> None:
    a, b = torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 20))
    ra, rb = random_routes((1, 9, 3), 4, 1), random_routes((1, 20, 3), 4, 1)
    padded = torch.cat([torch.cat([torch.zeros(1, 11, dtype=torch.long), a], 1), b])  # a left-padded
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :11] = 0
    routes = torch.cat([torch.cat([torch.full((1, 11, 3, 1), NO_ROUTE), ra], 1), rb])
    with torch.no_grad():
        out = model(padded, attention_mask=mask, routes=routes).logits
        packed = model(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 9, 29]),
                       routes=torch.cat([ra, rb], 1)).logits[0]
    assert (out[0, 11:] - packed[:9]).abs().max() < 1e-5
    assert (out[1] - packed[9:]).abs().max() < 1e-5


def test_cached_decoding_replays_step_by_step(model: SSEHForCausalLM) -> None:
    x = torch.randint(0, VOCAB, (1, 12))
    routes = random_routes((1, 12, 3), 4, 1)
    with torch.no_grad():
        full = model(x, routes=routes).logits[0]
        out = model(x[:, :8], routes=routes[:, :8], use_cache=True)
        steps = [out.logits[0]]
        for t in range(8, 12):
            out = model(x[:, t:t + 1], past_key_values=out.past_key_values, routes=routes[:, t:t + 1],
                        use_cache=True, output_routes=True)
            assert torch.equal(out.routes, routes[:, t:t + 1].to(torch.uint8))
            steps.append(out.logits[0])
    assert (torch.cat(steps) - full).abs().max() < 1e-5


def test_gradients_reach_the_router_under_replay(model: SSEHForCausalLM) -> None:
    """Own routes replayed: the same loss and gradients as a normal training forward (aux loss included, since its
    selection term uses the replayed routes); routes from elsewhere: the router still gets a gradient, through the
    weights of the replayed partitions."""
    trained = copy.deepcopy(model).train()
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        own = trained(x, output_routes=True).routes

    def grads(routes: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        trained.zero_grad()
        loss = trained(x, labels=x, routes=routes).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None}

    loss, normal = grads(None)
    replay_loss, replay = grads(own)
    assert (loss - replay_loss).abs() < 1e-6
    assert normal.keys() == replay.keys()
    for name in normal:
        assert (normal[name] - replay[name]).abs().max() < 1e-6, name
    _, foreign = grads(other_routes(own, 4))
    routers = [n for n in foreign if n.endswith(".attn.e_proj.weight")]
    assert len(routers) == 3 and all(foreign[n].abs().max() > 0 for n in routers)
    assert any((foreign[n] - normal[n]).abs().max() > 1e-6 for n in routers)


@pytest.mark.parametrize(("routes", "message"), [
    (torch.zeros(1, 6, 3, 1, dtype=torch.float32), "integer tensor"),
    (torch.zeros(1, 6, 2, 1, dtype=torch.long), "num SSE layers"),
    (torch.full((1, 6, 3, 1), 4), "out-of-range"),
    (torch.full((1, 6, 3, 1), -1), "out-of-range"),
], ids=["float", "layers", "too-large", "negative"])
def test_bad_routes_are_refused(model: SSEHForCausalLM, routes: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(torch.randint(0, VOCAB, (1, 6)), routes=routes)


def test_repeated_partitions_are_refused(model_k2: SSEHForCausalLM) -> None:
    routes = torch.zeros(1, 6, 3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="repeated"):
        model_k2(torch.randint(0, VOCAB, (1, 6)), routes=routes)
