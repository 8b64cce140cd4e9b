"""On CUDA: the whole SSE-H model's gradients through the Triton kernels equal those through the PyTorch reference,
on a GRPO-shaped packed micro-batch (many short sequences in one row), for a policy-gradient loss.

The op-level kernel tests check each kernel; this checks the model as the GRPO trainer drives it (packed rows,
`cu_seqlens`, logits gathered at completion positions, advantage-weighted log-probabilities), in fp32 and under
bf16 autocast. It needs a GPU (the kernels run on CUDA tensors only inside the model).
"""
from __future__ import annotations

import pytest
import torch
from sse_rl.grpo.logprobs import token_logprobs
from sse_rl.models import SSEHConfig, SSEHForCausalLM, ops
from sse_rl.packing import MicroBatch, Sequence, pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _packed_batch(num_seqs: int, vocab: int, seed: int) -> MicroBatch:
    """Random prompts + completions packed into one micro-batch by the trainer's own packing."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(num_seqs):
        length, prompt = int(torch.randint(20, 130, (1,), generator=g)), int(torch.randint(5, 15, (1,), generator=g))
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        advantage = float(torch.randn(1, generator=g))
        seqs.append(Sequence(ids[:prompt], ids[prompt:], [0.0] * (length - prompt), advantage, weight=1.0))
    (micro,) = pack(seqs, token_budget=sum(len(s) for s in seqs))[0]
    return micro


def _grads(model: SSEHForCausalLM, mb: MicroBatch, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.model(input_ids=mb.input_ids.cuda(), position_ids=mb.position_ids.cuda(),
                          cu_seqlens=mb.cu_seqlens.cuda(), use_cache=False)
        logits = model.lm_head(out.last_hidden_state[0, mb.target_pos.cuda()]).float()
    logp = token_logprobs(logits, mb.targets.cuda())
    loss = -(mb.advantages.cuda() * logp).mean() + model.config.aux_loss_coef * out.aux_loss.float()
    loss.backward()
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_errors(grads: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((grads[n] - truth[n]).norm() / truth[n].norm().clamp_min(1e-12)) for n in truth}


def _worst(errors: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_model_grads_triton_equal_reference(monkeypatch) -> None:
    """fp32: the kernels equal the reference (tf32 off). bf16 autocast: measured against the fp32 reference, the
    kernels' gradients are no further off than the PyTorch reference's own bf16 gradients (x2, or 2e-2)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = SSEHConfig.from_preset("sse-h-small", num_hidden_layers=4, attn_layers=[2])
    model = SSEHForCausalLM(config).cuda().train()
    batch = _packed_batch(120, config.vocab_size, seed=1)
    triton_fp32, triton_bf16 = _grads(model, batch, None), _grads(model, batch, torch.bfloat16)
    monkeypatch.setattr(ops, "_triton_impl", lambda *args: None)  # the PyTorch reference on the same tensors
    truth, reference_bf16 = _grads(model, batch, None), _grads(model, batch, torch.bfloat16)
    assert set(triton_fp32) == set(truth) == set(triton_bf16)
    fp32_errors = _rel_errors(triton_fp32, truth)
    assert max(fp32_errors.values()) < 1e-3, _worst(fp32_errors)
    kernel, reference = _rel_errors(triton_bf16, truth), _rel_errors(reference_bf16, truth)
    print("bf16 kernels vs fp32:", _worst(kernel), "\nbf16 reference vs fp32:", _worst(reference))
    too_far = {n: (kernel[n], reference[n]) for n in truth if kernel[n] > max(2 * reference[n], 2e-2)}
    assert not too_far, too_far
