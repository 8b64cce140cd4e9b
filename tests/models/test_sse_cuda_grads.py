"""On CUDA: the whole SSE-H model's gradients through the Triton kernels equal those through the PyTorch reference,
on a GRPO-shaped packed micro-batch (many short sequences in one row), for a policy-gradient loss.

The op-level kernel tests check each kernel; this checks the model as the GRPO trainer drives it (packed rows,
`cu_seqlens`, logits gathered at completion positions, advantage-weighted log-probabilities), in fp32 and under
bf16 autocast. It needs a GPU (the kernels run on CUDA tensors only inside the model).
"""
from __future__ import annotations

import pytest
import torch
from sse_rl.models import SSEHConfig, SSEHForCausalLM
from sse_rl.models import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _packed_batch(num_seqs: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 130, (num_seqs,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    ids = torch.randint(0, vocab, (1, int(cu[-1])), generator=g)
    pos = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    prompt = torch.randint(5, 15, (num_seqs,), generator=g)  # the first tokens of each sequence are its prompt
    spans = [(int(s) + int(p), int(e)) for s, e, p in zip(cu[:-1], cu[1:], prompt)]  # completion token ranges
    target_pos = torch.cat([torch.arange(s - 1, e - 1) for s, e in spans])  # logits one position earlier
    adv = torch.randn(num_seqs, generator=g)
    seq_of = torch.cat([torch.full((e - s,), i) for i, (s, e) in enumerate(spans)])
    return {"input_ids": ids, "position_ids": pos, "cu_seqlens": cu, "target_pos": target_pos,
            "targets": ids[0, target_pos + 1], "adv": adv[seq_of]}


def _grads(model: SSEHForCausalLM, batch: dict[str, torch.Tensor],
           dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    b = {k: v.cuda() for k, v in batch.items()}
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"],
                          use_cache=False)
        logits = model.lm_head(out.last_hidden_state[0, b["target_pos"]]).float()
    logp = torch.log_softmax(logits, -1).gather(1, b["targets"][:, None])[:, 0]
    loss = -(b["adv"] * logp).mean() + model.config.aux_loss_coef * out.aux_loss.float()
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
