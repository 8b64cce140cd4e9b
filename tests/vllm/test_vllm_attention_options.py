"""SSE-H attention options of converted Transformers in vLLM (CPU): q/k/v bias, o bias, q/k-norm and Llama 3 RoPE
scaling in one engine, greedy parity with the HF model at positions where the scaling matters, and an in-place weight
update of the options' tensors; plus vLLM's scaled RoPE (linear, llama3, yarn variants) against the HF one.

One engine serves the module, on a tiny random checkpoint whose biases and norm weights are made non-trivial (init
leaves biases at zero and norm weights at one, which a dropped bias or norm would not reveal).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sse_rl.init_model import init_model
from sse_rl.models import SSEHConfig
from sse_rl.models.layers import RotaryEmbedding
from sse_rl.models.vllm.weight_update import WORKER_EXTENSION, update_weights
from sse_rl.tokenizer import build_tiny_tokenizer
from vllm_testing import (
    LOGPROB_ATOL,
    assert_matches_hf,
    engine_env,
    greedy,
    load_hf,
    make_llm,
    random_prompts,
    reload_messages,
)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
OPTIONS = {"attn_qkv_bias": True, "attn_o_bias": True, "attn_qk_norm": True, "attn_rope_scaling": LLAMA3}
ATTN = "model.layers.1.attn."  # sse-h-tiny's one attention layer
# Past 64 positions Llama 3 RoPE stretches the low-frequency band: every prompt but the first runs well beyond it.
PROMPT_LENGTHS = [3, 70, 150, 230]
NEW_TOKENS = 40


@dataclass(frozen=True)
class Checkpoints:
    a: Path  # the engine's checkpoint
    b: Path  # `a` with other attention-layer biases and q/k-norm weights (the "new weights" of an update)


def _perturb(path: Path, seed: int, prefix: str = "") -> None:
    """Add noise to every bias and norm weight whose name starts with `prefix`, in place."""
    gen = torch.Generator().manual_seed(seed)
    file = path / "model.safetensors"
    weights = load_file(file)
    for name, tensor in weights.items():
        if name.startswith(prefix) and (name.endswith(".bias") or "norm." in name):
            weights[name] = tensor + 0.3 * torch.randn(tensor.shape, generator=gen)
    save_file(weights, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    root = tmp_path_factory.mktemp("sse_h_attn_options")
    build_tiny_tokenizer(root / "tokenizer")
    init_model("sse-h-tiny", root / "a", tokenizer=str(root / "tokenizer"), seed=0, **OPTIONS)
    _perturb(root / "a", seed=1)
    shutil.copytree(root / "a", root / "b")
    _perturb(root / "b", seed=2, prefix=ATTN)
    return Checkpoints(root / "a", root / "b")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(PROMPT_LENGTHS, vocab_size=512, seed=0)


def _rope_inputs(cache_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(min(cache_len, 512))
    return positions, torch.randn(len(positions), 4 * 32, generator=gen), torch.randn(len(positions), 2 * 32,
                                                                                       generator=gen)


# Run before the engine starts (module order): a RoPE built here has another max_position than the engine's (4096),
# so vLLM's get_rope cache never hands it to the engine.
@pytest.mark.parametrize("scaling", [
    LLAMA3,
    {"rope_type": "linear", "factor": 4},  # an int factor, as a config may spell it
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "beta_slow": 2, "truncate": False},  # original: max pos
], ids=["llama3", "linear-int-factor", "yarn", "yarn-attention-factor", "yarn-mscale", "yarn-betas-no-truncate"])
def test_vllm_rope_matches_hf(scaling):
    from sse_rl.models.vllm.model import rope_parameters
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    config = SSEHConfig.from_preset("sse-h-tiny", attn_rope_scaling=scaling, max_position_embeddings=512)
    with set_current_vllm_config(VllmConfig()):
        rope = get_rope(32, max_position=512, is_neox_style=True, rope_parameters=rope_parameters(config),
                        dtype=torch.float32)
    assert type(rope).__name__ != "RotaryEmbedding", "a scaled RoPE should not be vLLM's plain one"
    positions, q, k = _rope_inputs(rope.cos_sin_cache.shape[0])
    q_vllm, k_vllm = rope.forward_native(positions, q.clone(), k.clone())
    hf = RotaryEmbedding(32, config.rope_theta, scaling, config.max_position_embeddings)
    q_hf = hf(q.view(1, len(positions), 4, 32), positions[None]).view(q.shape)
    k_hf = hf(k.view(1, len(positions), 2, 32), positions[None]).view(k.shape)
    torch.testing.assert_close(q_vllm, q_hf, rtol=0, atol=1e-5)
    torch.testing.assert_close(k_vllm, k_hf, rtol=0, atol=1e-5)
    plain = RotaryEmbedding(32, config.rope_theta)(q.view(1, len(positions), 4, 32), positions[None]).view(q.shape)
    assert (q_hf - plain).abs().max() > 1e-2, "the scaling should change the rotation at these positions"


@pytest.fixture(scope="module")
def engine(checkpoints):
    with engine_env():
        llm = make_llm(checkpoints.a, worker_extension_cls=WORKER_EXTENSION)
        yield llm
        del llm


def _attention_modules(worker) -> dict[str, str]:
    """Runs on the (in-process) vLLM worker: the attention layer's submodule classes and parameter shapes."""
    attn = worker.model_runner.model.model.layers[1].attn
    return {"rotary": type(attn.rotary_emb).__name__,
            **{name: tuple(p.shape) for name, p in attn.named_parameters()}}


@pytest.mark.slow
def test_engine_builds_the_options(engine):
    modules = engine.collective_rpc(_attention_modules)[0]
    assert modules["rotary"] == "Llama3RotaryEmbedding"
    for name in ("qkv_proj.bias", "o_proj.bias", "q_norm.weight", "k_norm.weight"):
        assert name in modules, f"vLLM attention has no {name}: {sorted(modules)}"


def _mismatches(model, completions) -> bool:
    try:
        assert_matches_hf(model, completions)
    except AssertionError:
        return True
    return False


@pytest.mark.slow
def test_greedy_matches_hf(engine, checkpoints, prompts):
    completions = greedy(engine, prompts, NEW_TOKENS)
    assert len({tuple(c.tokens) for c in completions}) > 1, "different prompts should not all continue alike"
    hf = load_hf(checkpoints.a)
    worst = assert_matches_hf(hf, completions)
    print(f"max |logprob vLLM - HF| = {worst:.2e} (atol {LOGPROB_ATOL})")

    # The parity is not vacuous: the HF model without any one of the options disagrees with the engine.
    drops = {
        "q/k/v bias": lambda attn: [attn.q_proj.bias.zero_(), attn.k_proj.bias.zero_(), attn.v_proj.bias.zero_()],
        "o bias": lambda attn: attn.o_proj.bias.zero_(),
        "q/k-norm weights": lambda attn: [attn.q_norm.weight.fill_(1.0), attn.k_norm.weight.fill_(1.0)],
        "RoPE scaling": lambda attn: setattr(attn, "rotary", RotaryEmbedding(32, 10000.0)),
    }
    for label, drop in drops.items():
        hf = load_hf(checkpoints.a)
        with torch.no_grad():
            drop(hf.model.layers[1].attn)
        assert _mismatches(hf, completions), f"HF without the {label} still matches: the test cannot see it"


@pytest.mark.slow
def test_weight_update_of_the_options(engine, checkpoints, prompts):
    before = greedy(engine, prompts, NEW_TOKENS)
    new = {n: t for n, t in load_file(checkpoints.b / "model.safetensors").items() if n.startswith(ATTN)}
    assert {f"{ATTN}q_proj.bias", f"{ATTN}o_proj.bias", f"{ATTN}q_norm.weight", f"{ATTN}k_norm.weight"} <= set(new)

    with pytest.raises(ValueError, match=r"whole layers; missing .*k_proj"):  # biases join q/k/v in one module
        engine.collective_rpc("update_weights_from_tensors", args=({f"{ATTN}q_proj.bias": new[f"{ATTN}q_proj.bias"]},))
    with reload_messages() as messages:
        loaded = update_weights(engine, new)  # the attention layer only, through the file transport
    assert set(loaded) == {f"{ATTN}{m}" for m in ("qkv_proj.weight", "qkv_proj.bias", "o_proj.weight", "o_proj.bias",
                                                   "q_norm.weight", "k_norm.weight")}
    assert any(m.endswith(": Failed to load weights") for m in messages), "layers left out are still reported"
    assert not any(m.endswith("RotaryEmbedding: Failed to load weights") for m in messages), messages

    updated = greedy(engine, prompts, NEW_TOKENS)
    assert [c.tokens for c in updated] != [c.tokens for c in before], "new biases/norms should change the outputs"
    assert_matches_hf(load_hf(checkpoints.b), updated)

    old = {n: t for n, t in load_file(checkpoints.a / "model.safetensors").items() if n.startswith(ATTN)}
    update_weights(engine, old)
    assert [c.tokens for c in greedy(engine, prompts, NEW_TOKENS)] == [c.tokens for c in before]
