"""On CUDA: the whole SSE-H model's gradients through the Triton kernels equal those through the PyTorch reference,
on a GRPO-shaped packed micro-batch (many short sequences in one row), for a policy-gradient loss; packed
sequences give what each sequence gives alone (Triton SSE op, flash varlen attention under bf16).

The op-level kernel tests check each kernel; this checks the model as the GRPO trainer drives it (packed rows,
`cu_seqlens`, logits gathered at completion positions, advantage-weighted log-probabilities), in fp32 and under
bf16 autocast. It needs a GPU (the kernels run on CUDA tensors only inside the model).
"""
from __future__ import annotations

import pytest
import torch
from sse_rl.grpo.logprobs import logprobs_and_entropy
from sse_rl.models import SSEHConfig, SSEHForCausalLM, ops
from sse_rl.packing import MicroBatch, Sequence, pack

pytestmark = pytest.mark.gpu


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
    logp, _ = logprobs_and_entropy(logits, mb.targets.cuda())
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


def test_packed_equals_each_sequence_alone() -> None:
    """fp32 on CUDA (the Triton SSE op, masked SDPA): every packed sequence's logits and the gradients of a per-token
    loss equal running each sequence alone (no cu_seqlens)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    config = SSEHConfig.from_preset("sse-h-small", num_hidden_layers=4, attn_layers=[1, 3])
    model = SSEHForCausalLM(config).cuda().train()
    lengths = [37, 200, 5, 121]
    ids = torch.randint(0, config.vocab_size, (1, sum(lengths)), device="cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    weights = torch.randn(sum(lengths), config.vocab_size, device="cuda")

    packed = model(input_ids=ids, cu_seqlens=cu, use_cache=False).logits[0]  # [L, V]
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    alone = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        logits = model(input_ids=ids[:, start:end], use_cache=False).logits[0]
        (logits * weights[start:end]).sum().backward()
        alone.append(logits.detach())
    torch.testing.assert_close(packed.detach(), torch.cat(alone), rtol=1e-4, atol=1e-4)
    errors = _rel_errors({n: p.grad for n, p in model.named_parameters()}, packed_grads)
    assert max(errors.values()) < 1e-3, _worst(errors)


def test_varlen_attention_equals_sdpa_per_sequence() -> None:
    """Under bf16 autocast, packed sequences take flash varlen attention (no mask): outputs and input gradients
    match the same layer on each sequence alone (causal SDPA) to bf16 accuracy."""
    from sse_rl.models.layers import Attention, uses_varlen

    torch.manual_seed(0)
    layer = Attention(hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=10000.0).cuda()
    lengths = [300, 17, 129]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    pos = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    x = torch.randn(1, sum(lengths), 256, device="cuda", requires_grad=True)
    grad_out = torch.randn(1, sum(lengths), 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert uses_varlen(x)
        packed = layer(x, pos, cu_seqlens=cu)
        (packed.float() * grad_out).sum().backward()
        packed_grad, x.grad = x.grad.clone(), None
        alone = [layer(x[:, s:e], pos[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
        (torch.cat(alone, 1).float() * grad_out).sum().backward()
    torch.testing.assert_close(packed.float(), torch.cat(alone, 1).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(packed_grad, x.grad, rtol=2e-2, atol=2e-2)
