"""Fused decode step against naive.sse_decode (in-place slot cache, padded rows), and chained after a prefill."""
import pytest
import torch
import torch.nn.functional as F
from kernel_testing import DEVICE, ON_GPU, assert_close, op_args
from sse_rl.models.ops.chunk import sse_triton
from sse_rl.models.ops.decode import sse_decode_triton
from sse_rl.models.ops.naive import sse_decode, sse_recurrent

DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def step_inputs(B, H, DK, DV, N, dtype):
    x = lambda *shape: torch.randn(*shape, device=DEVICE)
    feats = [F.silu(x(B, H, DK)), x(B, H, DK).softmax(-1), F.silu(x(B, H, DK)), x(B, H, DK).softmax(-1),
             F.silu(x(B, H, DV)), F.logsigmoid(x(B, H, DK)) / 16, F.logsigmoid(x(B, H, DK)) / 16, x(B, N)]
    return [f.to(dtype) for f in feats]


CASES = [(5, 2, 24, 40, 4, 2, 7), (1, 1, 16, 16, 4, 1, 1), (6, 3, 32, 16, 8, 3, 9)]
if ON_GPU:
    CASES += [(64, 10, 256, 256, 4, 1, 80), (33, 4, 128, 64, 4, 2, 40), (256, 2, 64, 128, 6, 4, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,DK,DV,N,K,slots", CASES, ids=lambda c: str(c))
def test_decode_matches_reference(B, H, DK, DV, N, K, slots, dtype) -> None:
    feats = step_inputs(B, H, DK, DV, N, dtype)
    state = torch.randn(slots, N + 1, H, DK, DV, device=DEVICE)
    slot_ids = torch.randperm(slots, device=DEVICE)[:B]
    slot_ids[::3] = -1  # padded rows
    tri_state, ref_state = state.clone(), state.clone()
    o = sse_decode_triton(**op_args(feats), state=tri_state, slot_ids=slot_ids, top_k=K)
    ro = sse_decode(**op_args([f.float() for f in feats]), state=ref_state, slot_ids=slot_ids, top_k=K)
    assert o.dtype == dtype
    assert_close("o", ro, o.float(), 1e-4 if dtype == torch.float32 else 2e-2)
    assert_close("state", ref_state, tri_state, 1e-5)
    assert (o[slot_ids < 0] == 0).all()
    untouched = torch.ones(slots, dtype=torch.bool, device=DEVICE)
    untouched[slot_ids[slot_ids >= 0]] = False
    assert torch.equal(tri_state[untouched], state[untouched])


def test_decode_continues_a_prefill() -> None:
    """Prefill T tokens with the chunk kernel, then decode token T+1 from its final state into slot 2: the output
    equals the recurrence over all T+1 tokens, and the slot holds its final state."""
    T, H, DK, DV, N, K = 40, 2, 16, 32, 4, 2
    feats = [f.unsqueeze(0) for f in step_inputs(T + 1, H, DK, DV, N, torch.float32)]  # [1, T+1, ...]
    _, prefill = sse_triton(**op_args([f[:, :T] for f in feats]), top_k=K, output_final_state=True)
    cache = torch.zeros(4, N + 1, H, DK, DV, device=DEVICE)
    cache[2] = prefill[0]
    o = sse_decode_triton(**op_args([f[0, T:] for f in feats]), state=cache, slot_ids=torch.tensor([2], device=DEVICE),
                          top_k=K)
    ro, rstate = sse_recurrent(**op_args(feats), top_k=K, output_final_state=True)
    assert_close("o", ro[0, T:], o, 1e-4)
    assert_close("state", rstate[0], cache[2], 1e-4)


def test_decode_rejects_bad_state() -> None:
    feats = step_inputs(2, 2, 16, 16, 4, torch.float32)
    slots = torch.tensor([0, 1], device=DEVICE)
    args = op_args(feats)
    with pytest.raises(ValueError, match="state must be fp32 or bf16"):
        sse_decode_triton(**args, state=torch.zeros(2, 5, 2, 16, 16, device=DEVICE, dtype=torch.float16),
                          slot_ids=slots, top_k=1)
    with pytest.raises(ValueError, match="state must be fp32"):
        sse_decode_triton(**args, state=torch.zeros(2, 4, 2, 16, 16, device=DEVICE), slot_ids=slots, top_k=1)
    with pytest.raises(ValueError, match="slot_ids"):
        sse_decode_triton(**args, state=torch.zeros(2, 5, 2, 16, 16, device=DEVICE), slot_ids=slots.float(), top_k=1)


def test_decode_on_padded_slot_cache() -> None:
    """vLLM's state cache pads every slot (stride(0) > one state): the kernel updates the slot views in place and
    leaves the padding alone."""
    B, H, DK, DV, N, K, slots = 3, 2, 16, 32, 4, 1, 5
    feats = step_inputs(B, H, DK, DV, N, torch.float32)
    numel = (N + 1) * H * DK * DV
    pages = torch.randn(slots, numel + 64, device=DEVICE)
    state = pages[:, :numel].view(slots, N + 1, H, DK, DV)  # strided view, as vLLM hands it out
    assert not state.is_contiguous()
    ref_state = state.clone()
    padding = pages[:, numel:].clone()
    slot_ids = torch.tensor([4, -1, 1], device=DEVICE)
    o = sse_decode_triton(**op_args(feats), state=state, slot_ids=slot_ids, top_k=K)
    ro = sse_decode(**op_args(feats), state=ref_state, slot_ids=slot_ids, top_k=K)
    assert_close("o", ro, o, 1e-4)
    assert_close("state", ref_state, state, 1e-5)
    assert torch.equal(pages[:, numel:], padding)


def test_decode_writes_into_out() -> None:
    """`out=`: the op writes the caller's buffer in place (rows of a bigger output, as the vLLM layer passes them)
    and returns it, through the dispatcher (Triton on CUDA, the reference on CPU); a mismatched buffer is refused."""
    from sse_rl.models.ops import sse_decode as dispatch

    B, H, DK, DV, N, K, slots = 4, 2, 16, 32, 4, 2, 6
    feats = step_inputs(B, H, DK, DV, N, torch.float32)
    state = torch.randn(slots, N + 1, H, DK, DV, device=DEVICE)
    slot_ids = torch.tensor([3, -1, 0, 5], device=DEVICE)
    ref_state = state.clone()
    buffer = torch.full((B + 3, H, DV), float("nan"), device=DEVICE)
    returned = dispatch(**op_args(feats), state=state, slot_ids=slot_ids, top_k=K, out=buffer[:B])
    ro = sse_decode(**op_args(feats), state=ref_state, slot_ids=slot_ids, top_k=K)
    assert returned.data_ptr() == buffer.data_ptr()
    assert_close("o", ro, buffer[:B], 1e-4)
    assert_close("state", ref_state, state, 1e-5)
    assert buffer[B:].isnan().all()
    with pytest.raises(ValueError, match="out must be"):
        sse_decode_triton(**op_args(feats), state=state, slot_ids=slot_ids, top_k=K,
                          out=buffer[:B].to(torch.bfloat16))
