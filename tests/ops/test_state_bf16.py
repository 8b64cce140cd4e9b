"""A bf16 SSE state (an engine's `mamba_ssm_cache_dtype="bfloat16"`, issue #27) in the decode and chunk ops: the
kernels compute in fp32 and round the stored state once per step, so a bf16-state step is the fp32-state step with
its stored state rounded to bf16, and the state stays bf16 in place. Tolerances follow from one rounding's bound
(module constants).

Compiled Triton and torch round fp32 to bf16 to nearest even; the Triton interpreter (CPU CI) truncates toward zero
(`triton/runtime/interpreter.py`, `_convert_float` without a rounding mode), so the exact checks name the rounding
of the platform the kernel runs on."""
import pytest
import torch
from kernel_testing import DEVICE, ON_GPU, assert_close, op_args, rel_err
from sse_rl.models.ops import naive
from sse_rl.models.ops.chunk import sse_triton
from sse_rl.models.ops.decode import sse_decode_triton
from test_chunk import sse_inputs
from test_decode import step_inputs

# bf16 keeps 8 significant bits: rounding to it, to nearest or toward zero, moves an element by less than one ulp,
# 2^-7 of its value, so also in norm; and two such roundings of one fp32 value differ by at most that.
BF16_ULP = 2.0**-7
# Decode steps chained from one start: each step rounds the state once and the carried error is decayed (gates
# <= 0) but not amplified, so after T steps the state and the outputs it reads are within T roundings.
STEPS = 8
# fp32 results computed in two summation orders (Triton vs the PyTorch reference): as the fp32 tests of the ops.
FP32_TOL = 1e-4


def kernel_rounding(x: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded to bf16 as the Triton kernels round it here (module doc)."""
    if ON_GPU:
        return x.to(torch.bfloat16)
    return (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # exact: the low bits cleared


def bf16_exact(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16 values, kept in fp32: a state both dtypes hold exactly, so two paths start equal."""
    return x.to(torch.bfloat16).float()


def decode_case(seed: int = 42):
    torch.manual_seed(seed)
    B, H, DK, DV, N, K, slots = 5, 2, 24, 40, 4, 2, 7
    feats = step_inputs(B, H, DK, DV, N, torch.float32)
    state = bf16_exact(torch.randn(slots, N + 1, H, DK, DV, device=DEVICE))
    slot_ids = torch.randperm(slots, device=DEVICE)[:B]
    slot_ids[::3] = -1  # padded rows
    return feats, state, slot_ids, K


@pytest.mark.parametrize("impl,rounding", [(sse_decode_triton, kernel_rounding),
                                           (naive.sse_decode, lambda x: x.to(torch.bfloat16))],
                         ids=["triton", "reference"])
def test_decode_bf16_state_is_the_rounded_fp32_step(impl, rounding) -> None:
    feats, state, slot_ids, K = decode_case()
    fp32_state, bf16_state = state.clone(), state.to(torch.bfloat16)
    storage = bf16_state.data_ptr()
    o32 = impl(**op_args(feats), state=fp32_state, slot_ids=slot_ids, top_k=K)
    o16 = impl(**op_args(feats), state=bf16_state, slot_ids=slot_ids, top_k=K)
    assert bf16_state.dtype == torch.bfloat16 and bf16_state.data_ptr() == storage, "updated in place, still bf16"
    # Same fp32 arithmetic from the same values (the load is exact): the read-out uses the unrounded state.
    assert torch.equal(o16, o32)
    assert torch.equal(bf16_state, rounding(fp32_state)), "the fp32 step, rounded once"
    assert rel_err(fp32_state, bf16_state) < BF16_ULP
    untouched = torch.ones(state.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[slot_ids[slot_ids >= 0]] = False
    assert torch.equal(bf16_state[untouched].float(), state[untouched])


def test_decode_bf16_state_kernel_matches_reference() -> None:
    feats, state, slot_ids, K = decode_case(seed=7)
    tri_state, ref_state = state.to(torch.bfloat16), state.to(torch.bfloat16)
    o = sse_decode_triton(**op_args(feats), state=tri_state, slot_ids=slot_ids, top_k=K)
    ro = naive.sse_decode(**op_args(feats), state=ref_state, slot_ids=slot_ids, top_k=K)
    assert_close("o", ro, o, FP32_TOL)
    assert_close("state", ref_state, tri_state, BF16_ULP)


def test_decode_chain_stays_within_one_rounding_per_step() -> None:
    """STEPS decode steps of one set of sequences from one start, fp32 vs bf16 state: the drift stays below
    STEPS roundings (module doc)."""
    feats, state, _, K = decode_case(seed=3)
    slot_ids = torch.arange(feats[0].shape[0], device=DEVICE)
    fp32_state, bf16_state = state.clone(), state.to(torch.bfloat16)
    outs32, outs16 = [], []
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        step_feats = step_inputs(*feats[0].shape, feats[4].shape[-1], feats[7].shape[-1], torch.float32)
        outs32.append(sse_decode_triton(**op_args(step_feats), state=fp32_state, slot_ids=slot_ids, top_k=K))
        outs16.append(sse_decode_triton(**op_args(step_feats), state=bf16_state, slot_ids=slot_ids, top_k=K))
    drift = STEPS * BF16_ULP
    assert_close("state", fp32_state, bf16_state.float(), drift)
    assert_close("o", torch.stack(outs32), torch.stack(outs16), drift)
    assert rel_err(fp32_state, bf16_state) > 0, "the bf16 state must have been rounded"


@pytest.mark.parametrize("impl", [sse_triton, naive.sse_chunk_varlen, naive.sse_recurrent],
                         ids=["triton", "reference-varlen", "reference-recurrent"])
def test_chunk_takes_and_returns_a_bf16_state(impl) -> None:
    """A prefill resumed from a bf16 cache: the initial state is cast up on load (outputs equal the fp32 state's
    to fp32 accuracy), the final state comes back bf16, the fp32 final rounded once."""
    torch.manual_seed(42)
    cu = torch.tensor([0, 3, 40, 70], device=DEVICE)
    feats, h0 = sse_inputs(1, 70, 2, 16, 32, 4, 3, torch.float32)
    h0 = bf16_exact(h0)
    o32, h32 = impl(**op_args(feats), top_k=2, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o16, h16 = impl(**op_args(feats), top_k=2, initial_state=h0.to(torch.bfloat16), output_final_state=True,
                    cu_seqlens=cu)
    assert h16.dtype == torch.bfloat16 and h32.dtype == torch.float32
    assert_close("o", o32, o16, 1e-6)
    assert rel_err(h32, h16) < BF16_ULP
    _, ref = naive.sse_recurrent(**op_args(feats), top_k=2, initial_state=h0, output_final_state=True,
                                 cu_seqlens=cu)
    assert_close("final_state", ref, h16.float(), BF16_ULP + FP32_TOL)


def test_invalid_state_dtype_is_named() -> None:
    feats, state, slot_ids, K = decode_case()
    for decode in (sse_decode_triton, naive.sse_decode):
        with pytest.raises(ValueError, match="torch.float16"):
            decode(**op_args(feats), state=state.half(), slot_ids=slot_ids, top_k=K)
    chunk_feats, h0 = sse_inputs(1, 8, 2, 16, 16, 4, 1, torch.float32)
    for chunk in (sse_triton, naive.sse_chunk_varlen):
        with pytest.raises(ValueError, match="initial_state must be .*torch.float16"):
            chunk(**op_args(chunk_feats), top_k=1, initial_state=h0.half(), output_final_state=True)
