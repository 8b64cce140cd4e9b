"""The HF SSE-H model: loading, packing, padding, cache decoding, generate, checkpointing, dtypes, aux loss."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from sse_rl.models import SSEHConfig, SSEHForCausalLM
from sse_rl.models.modeling import SSEHModel
from sse_rl.models.ops import sse_router
from transformers import AutoModel, AutoModelForCausalLM

VOCAB = 512
ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> SSEHForCausalLM:
    torch.manual_seed(0)
    return SSEHForCausalLM(SSEHConfig.from_preset("sse-h-tiny")).eval()


def tokens(*lengths: int) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (1, n)) for n in lengths]


@torch.no_grad()
def logits_alone(model: SSEHForCausalLM, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(s).logits[0] for s in seqs]


def test_parameter_names_follow_fla(model: SSEHForCausalLM) -> None:
    patterns = [
        r"model\.embeddings\.weight", r"model\.norm\.weight", r"lm_head\.weight",
        r"model\.layers\.\d+\.(attn_norm|mlp_norm)\.weight", r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
        r"model\.layers\.\d+\.attn\.(q|k|v|o|e)_proj\.weight", r"model\.layers\.\d+\.attn\.o_norm\.weight",
        r"model\.layers\.\d+\.attn\.(lora_q_proj|lora_k_proj|g_proj)\.[01]\.weight",
        r"model\.layers\.\d+\.attn\.gk_proj\.[01]\.0\.weight",
        r"model\.layers\.\d+\.attn\.gk_proj\.[01]\.1\.(weight|bias)",
    ]
    names = list(model.state_dict())
    assert [n for n in names if not any(re.fullmatch(p, n) for p in patterns)] == []
    assert "model.layers.0.attn.gk_proj.1.1.bias" in names and "model.layers.1.attn.e_proj.weight" not in names


def test_auto_classes_load_without_remote_code(model: SSEHForCausalLM, tmp_path) -> None:
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SSEHForCausalLM
    assert isinstance(AutoModel.from_pretrained(tmp_path), SSEHModel)
    x = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@torch.no_grad()
def test_packed_equals_each_sequence_alone(model: SSEHForCausalLM) -> None:
    seqs = tokens(7, 1, 70)  # 70 crosses a chunk boundary
    alone = logits_alone(model, seqs)
    packed_ids = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    by_positions = model(packed_ids, position_ids=position_ids).logits[0]
    by_bounds = model(packed_ids, cu_seqlens=torch.tensor([0, 7, 8, 78])).logits[0]
    assert torch.allclose(by_positions, by_bounds, atol=ATOL)
    for (a, b), ref in zip([(0, 7), (7, 8), (8, 78)], alone):
        assert torch.allclose(by_positions[a:b], ref, atol=ATOL)
    # Nothing leaks across sequences: changing the first sequence leaves the others' logits unchanged.
    changed = packed_ids.clone()
    changed[0, :7] = (changed[0, :7] + 1) % VOCAB
    assert torch.allclose(model(changed, position_ids=position_ids).logits[0, 7:], by_positions[7:], atol=ATOL)
    assert not torch.allclose(model(changed, position_ids=position_ids).logits[0, :7], by_positions[:7], atol=1e-3)


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_does_not_change_real_tokens(model: SSEHForCausalLM, side: str) -> None:
    seqs = tokens(5, 12)
    alone = logits_alone(model, seqs)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(12 - s.shape[1], 12) if side == "left" else slice(0, s.shape[1])
        ids[row, cols], mask[row, cols] = s[0], 1
    logits = model(ids, attention_mask=mask).logits
    for row, ref in enumerate(alone):
        assert torch.allclose(logits[row][mask[row].bool()], ref, atol=ATOL)


@torch.no_grad()
def test_cached_decoding_equals_full_forward(model: SSEHForCausalLM) -> None:
    x = torch.randint(0, VOCAB, (2, 30))
    full = model(x).logits
    out = model(x[:, :12], use_cache=True)
    steps = [out.logits]
    out = model(x[:, 12:17], past_key_values=out.past_key_values, use_cache=True)  # a multi-token chunk
    steps.append(out.logits)
    for t in range(17, 30):
        out = model(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)
    state = out.past_key_values.layers[0].recurrent_states[0]
    assert state.shape == (2, *model.config.sse_state_shape()) == (2, 5, 2, 64, 64) and state.dtype == torch.float32


@torch.no_grad()
def test_greedy_generate_equals_argmax_of_full_forwards(model: SSEHForCausalLM) -> None:
    prompt = torch.randint(0, VOCAB, (2, 6))
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert generated.shape == (2, 16)
    for t in range(6, 16):
        assert torch.equal(model(generated[:, :t]).logits[:, -1].argmax(-1), generated[:, t])


@torch.no_grad()
def test_left_padded_generate_equals_unpadded(model: SSEHForCausalLM) -> None:
    short, long = tokens(4, 9)
    ids = torch.cat([F.pad(short, (5, 0)), long])
    mask = torch.cat([F.pad(torch.ones_like(short), (5, 0)), torch.ones_like(long)])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(batch[0, 9:], model.generate(short, max_new_tokens=8, do_sample=False)[0, 4:])
    assert torch.equal(batch[1, 9:], model.generate(long, max_new_tokens=8, do_sample=False)[0, 9:])


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed(model: SSEHForCausalLM) -> None:
    prompt = torch.randint(0, VOCAB, (2, 5))
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    beams = model.generate(prompt, max_new_tokens=6, num_beams=2, do_sample=False)
    assert beams.shape == (2, 11)


def loss_and_grads(model: SSEHForCausalLM, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(model: SSEHForCausalLM) -> None:
    trained = copy.deepcopy(model).train()
    x = torch.randint(0, VOCAB, (2, 20))
    loss, grads = loss_and_grads(trained, x)
    trained.gradient_checkpointing_enable()
    assert trained.model.layers[0].gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(trained, x)
    assert torch.equal(loss, loss_ckpt)
    for name, grad in grads.items():
        assert torch.allclose(grads_ckpt[name], grad, atol=1e-7), name
    assert grads["model.layers.0.attn.e_proj.weight"].abs().max() > 0, "the router is trained"


@torch.no_grad()
def test_bf16_forward_is_finite_and_close_to_fp32(model: SSEHForCausalLM) -> None:
    x = torch.randint(0, VOCAB, (2, 40))
    ref = model(x).logits
    low = copy.deepcopy(model).to(torch.bfloat16)(x).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert F.cosine_similarity(low.float().flatten(), ref.flatten(), dim=0) > 0.999


def test_autocast_features_meet_the_kernel_contract(model: SSEHForCausalLM) -> None:
    """fp32 master weights under bf16 autocast (the trainer's mixed precision): the features handed to the SSE op
    must be one 16-bit dtype for q/k/v (softmax runs in fp32 inside) with fp32 or 16-bit gates, as the Triton op
    checks on CUDA."""
    from sse_rl.models.ops.chunk import check_sse_inputs

    layer = model.model.layers[0].attn
    x = torch.randn(1, 5, model.config.hidden_size)  # fp32 residual stream
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = layer._features(x)
        logits = layer.e_proj(x)
    assert {t.dtype for t in features[:5]} == {torch.bfloat16}
    assert check_sse_inputs(features=features, router_logits=logits, top_k=model.config.num_writer,
                            initial_state=None, cu_seqlens=None) == 1


def test_aux_loss_is_in_the_loss_in_training_only(model: SSEHForCausalLM) -> None:
    trained = copy.deepcopy(model).train()
    x = torch.randint(0, VOCAB, (2, 16))
    out = trained(x, labels=x)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert out.aux_loss > 0.5  # about 1 per SSE layer for a balanced router
    assert torch.allclose(out.loss, ce + trained.config.aux_loss_coef * out.aux_loss, atol=1e-6)
    assert trained.eval()(x).aux_loss == 0


def test_aux_loss_equals_hand_computation() -> None:
    torch.manual_seed(0)
    config = SSEHConfig.from_preset("sse-h-tiny", num_hidden_layers=1, attn_layers=[], num_writer=2, num_reader=2)
    one_layer = SSEHForCausalLM(config).train()
    x = torch.randint(0, VOCAB, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    aux = one_layer(x, attention_mask=mask).aux_loss
    layer = one_layer.model.layers[0]
    logits = layer.attn.e_proj(layer.attn_norm(one_layer.model.embeddings(x)))[mask.bool()]  # [real tokens, N]
    probs = logits.double().softmax(-1)
    top2 = probs.argsort(-1, descending=True)[:, :2]
    n, k = 4, 2
    expected = (n / k) * sum(probs[:, i].mean() * (top2 == i).any(-1).double().mean() for i in range(n))
    assert abs(aux.item() - expected.item()) < 1e-6
    _, _, indices = sse_router(logits, top_k=2)
    assert torch.equal(indices, top2)


@torch.no_grad()
def test_pure_sse_model_decodes_with_a_cache_but_refuses_hf_generate() -> None:
    torch.manual_seed(0)
    pure = SSEHForCausalLM(SSEHConfig.from_preset("sse-h-tiny", num_hidden_layers=2, attn_layers=[])).eval()
    x = torch.randint(0, VOCAB, (2, 9))
    out = pure(x[:, :4], use_cache=True)
    steps = [out.logits]
    for t in range(4, 9):
        out = pure(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), pure(x).logits, atol=ATOL)
    with pytest.raises(NotImplementedError, match="attention layer"):
        pure.generate(x, max_new_tokens=2)


def test_bad_inputs_raise(model: SSEHForCausalLM) -> None:
    x = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(x, inputs_embeds=torch.zeros(1, 6, 128))
    with pytest.raises(ValueError, match="padding-free"):
        model(x, cu_seqlens=torch.tensor([0, 3, 6]), attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.randint(0, VOCAB, (2, 6)), cu_seqlens=torch.tensor([0, 3, 6]))
