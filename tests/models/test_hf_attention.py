"""Dense HF Transformers on packed rows through flash varlen attention (`sse_rl.models.hf_attention`).

On CPU: the switch leaves CPU/fp32 runs and SSE-H alone, the implementation is never written into a checkpoint,
inputs it does not take (no CUDA half precision, a cache, a batch of several rows) raise naming what they are, and
its plumbing around the kernel gives SDPA's logits with the kernel replaced by causal SDPA per sequence.
On a GPU (marked gpu): a Qwen3 with GQA and q/k-norm gives the same logits and gradients on a packed row under bf16
autocast as with transformers' SDPA and its block-diagonal mask, from TRL's `cu_seq_lens_q` or the position ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sse_rl.models import SSEHConfig, SSEHForCausalLM
from sse_rl.models.hf_attention import VARLEN_ATTENTION, register, use_varlen_attention
from sse_rl.models.modeling import packed_position_ids
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

LENGTHS = [37, 5, 90]


def _qwen3(seed: int = 0) -> Qwen3ForCausalLM:
    """A small Qwen3 with GQA (4 query / 2 key-value heads) and q/k-norm."""
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    return Qwen3ForCausalLM(config)


def _packed_row(device: str = "cpu") -> dict[str, torch.Tensor]:
    """Three sequences in one row, with the keys TRL's padding-free collator gives a batch."""
    ids = torch.randint(0, 300, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    position_ids = packed_position_ids(cu)
    return {"input_ids": ids.to(device), "position_ids": position_ids.to(device), "cu_seq_lens_q": cu.to(device),
            "cu_seq_lens_k": cu.to(device), "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine's choice")
def test_cpu_and_sse_h_keep_their_attention() -> None:
    model = _qwen3()
    assert not use_varlen_attention(model, half_precision=True)  # no CUDA here
    assert model.config._attn_implementation == "sdpa"
    sse_h = SSEHForCausalLM(SSEHConfig.from_preset("sse-h-tiny"))
    assert not use_varlen_attention(sse_h, half_precision=True)


def test_implementation_is_not_saved_with_the_checkpoint(tmp_path: Path) -> None:
    """A checkpoint trained with it loads where the implementation is not registered (vLLM, another process)."""
    register()
    model = _qwen3()
    model.set_attn_implementation(VARLEN_ATTENTION)
    model.save_pretrained(tmp_path)
    assert VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_unsupported_inputs_raise_naming_them() -> None:
    register()
    model = _qwen3()
    model.set_attn_implementation(VARLEN_ATTENTION)
    row = _packed_row()
    with pytest.raises(NotImplementedError, match="cpu torch.float32 without CUDA autocast"):
        model(**row, use_cache=False)
    with pytest.raises(NotImplementedError, match=r"batch 2 \(packed rows are batch 1\)"):
        model(input_ids=torch.randint(0, 300, (2, 8)), use_cache=False)
    model.set_attn_implementation("sdpa")  # the cached prefix, then one step with the varlen implementation
    out = model(input_ids=torch.randint(0, 300, (1, 8)), use_cache=True)
    model.set_attn_implementation(VARLEN_ATTENTION)
    with pytest.raises(NotImplementedError, match=r"a cache \(9 keys for 1 queries\)"):
        model(input_ids=torch.randint(0, 300, (1, 1)), past_key_values=out.past_key_values, use_cache=True)


def _reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1)):
    """torch's `varlen_attn` contract (causal with window (-1, 0), default scale) by causal SDPA per sequence."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and window_size == (-1, 0)
    assert q.shape[1] == k.shape[1] == v.shape[1], "varlen_attn gets as many key/value heads as query heads"
    bounds = cu_q.tolist()
    return torch.cat([torch.nn.functional.scaled_dot_product_attention(
        *(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:])])


@pytest.mark.parametrize("bounds", ["cu_seq_lens", "position_ids"])
def test_packed_row_plumbing_on_cpu(bounds: str, monkeypatch) -> None:
    """What the implementation does around the kernel (layout, GQA, sequence bounds from TRL's `cu_seq_lens_q` or
    from the position ids, the output transformers expects) gives SDPA's logits on a packed row, with torch's
    CUDA-only `varlen_attn` and the CUDA guard replaced on this CPU by causal SDPA per sequence."""
    import torch.nn.attention.varlen as varlen

    import sse_rl.models.hf_attention as hf_attention

    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen_attn)
    monkeypatch.setattr(hf_attention, "uses_varlen", lambda x: True)
    row = _packed_row()
    if bounds == "position_ids":
        row = {key: row[key] for key in ("input_ids", "position_ids")}
    model = _qwen3().eval()
    with torch.no_grad():
        reference = model(**row, use_cache=False).logits
        register()
        model.set_attn_implementation(VARLEN_ATTENTION)
        logits = model(**row, use_cache=False).logits
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bounds", ["cu_seq_lens", "position_ids"])
def test_packed_row_matches_sdpa_with_block_mask(bounds: str) -> None:
    """Logits and parameter gradients on a packed row under bf16 autocast: varlen equals transformers' SDPA path
    (dense block-diagonal mask from the position ids) to bf16 accuracy."""
    row = _packed_row("cuda")
    if bounds == "position_ids":
        row = {key: row[key] for key in ("input_ids", "position_ids")}
    results = []
    for implementation in ("sdpa", VARLEN_ATTENTION):
        model = _qwen3().cuda()
        if implementation == "sdpa":
            assert model.config._attn_implementation == "sdpa"
        else:
            assert use_varlen_attention(model, half_precision=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(**row, use_cache=False).logits.float()
        (logits.log_softmax(-1)[..., 0].sum()).backward()
        results.append((logits.detach(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=3e-2, atol=3e-2)
    for name, grad in grads.items():
        err = (grad - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-6)
        assert err < 3e-2, (name, float(err))
