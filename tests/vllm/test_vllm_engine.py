"""SSE-H in a real vLLM engine (CPU): greedy parity with the HF model, in-place weight updates, strict loading.

One engine on the seed-0 checkpoint serves the module; the weight-update test compares it, updated in place to the
seed-1 weights, against a fresh engine started on the seed-1 checkpoint.
"""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load_file
from sse_rl.models.vllm.weight_update import WORKER_EXTENSION, update_weights
from vllm_testing import assert_matches_hf, engine_env, greedy, load_hf, make_llm, random_prompts, reload_messages

pytestmark = pytest.mark.slow  # starts vLLM engines

# Mixed lengths (a 1-token prompt included) submitted together: prefills of several sizes and decodes batch up.
PROMPT_LENGTHS = [1, 3, 10, 41, 120, 300]
NEW_TOKENS = 64


def _parameter_names(worker) -> list[str]:
    """Runs on the (in-process) vLLM worker."""
    return sorted(name for name, _ in worker.model_runner.model.named_parameters())


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    with engine_env():
        llm = make_llm(tiny_checkpoints.w0, worker_extension_cls=WORKER_EXTENSION)
        yield llm
        del llm


@pytest.fixture(scope="module")
def fresh_w1_engine(tiny_checkpoints, engine):
    """An engine started on the seed-1 checkpoint. In-process engines share vLLM's process-global parallel groups,
    which the first engine to shut down destroys, so this one lives as long as `engine` (torn down before it)."""
    with engine_env():
        llm = make_llm(tiny_checkpoints.w1)
        yield llm
        del llm


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(PROMPT_LENGTHS, vocab_size=512, seed=0)


def test_registered_through_the_entry_point(engine):
    from sse_rl.models.vllm import ARCHITECTURE, register
    from vllm import ModelRegistry

    register()  # vLLM already ran it in this process; a second call must be harmless
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


def test_greedy_batch_matches_hf(engine, tiny_checkpoints, prompts):
    completions = greedy(engine, prompts, NEW_TOKENS)
    assert [len(c.tokens) for c in completions] == [NEW_TOKENS] * len(prompts)
    assert len({tuple(c.tokens) for c in completions}) > 1, "different prompts should not all continue alike"
    worst = assert_matches_hf(load_hf(tiny_checkpoints.w0), completions)
    print(f"max |logprob vLLM - HF| = {worst:.2e}")


def test_weight_update_equals_fresh_engine(engine, fresh_w1_engine, tiny_checkpoints, prompts):
    before = greedy(engine, prompts, NEW_TOKENS)
    new_weights = load_file(tiny_checkpoints.w1 / "model.safetensors")
    # Two partial batches of whole layers, as an RL trainer streams them.
    first_half = {n: t for n, t in new_weights.items() if n.startswith(("model.layers.0.", "model.layers.1."))}
    second_half = {n: t for n, t in new_weights.items() if n not in first_half}
    with reload_messages() as messages:  # the engine runs in this process
        first = update_weights(engine, first_half)
    # the layers a partial update leaves out are still reported; the derived rotary cache is not
    assert "ColumnParallelLinear: Failed to load weights" in messages
    assert "RotaryEmbedding: Failed to load weights" not in messages
    second = update_weights(engine, second_half)
    assert set(first) | set(second) == set(engine.collective_rpc(_parameter_names)[0])
    assert not set(first) & set(second)
    updated = greedy(engine, prompts, NEW_TOKENS)
    fresh = greedy(fresh_w1_engine, prompts, NEW_TOKENS)
    assert [c.tokens for c in updated] == [c.tokens for c in fresh]
    assert [c.tokens for c in updated] != [c.tokens for c in before], "new weights should change the outputs"
    for u, f in zip(updated, fresh):
        torch.testing.assert_close(torch.tensor(u.logprobs), torch.tensor(f.logprobs), rtol=0, atol=1e-5)
    # And back, through the file transport: the engine returns exactly to the seed-0 outputs.
    engine.collective_rpc("update_weights_from_file", args=(str(tiny_checkpoints.w0 / "model.safetensors"),))
    assert engine.reset_prefix_cache()
    assert [c.tokens for c in greedy(engine, prompts, NEW_TOKENS)] == [c.tokens for c in before]




def _load_into_model(worker, name: str) -> set[str]:
    """Runs on the (in-process) vLLM worker: the model's own loader, as at engine start."""
    return worker.model_runner.model.load_weights([(name, torch.zeros(4, 4))])


def test_load_weights_rejects_unmappable_name(engine):
    with pytest.raises(ValueError, match="model.layers.0.attn.not_a_param.weight"):
        engine.collective_rpc(_load_into_model, args=("model.layers.0.attn.not_a_param.weight",))


@pytest.mark.parametrize(("weights", "message"), [
    ({"model.layers.0.attn.not_a_param.weight": torch.zeros(4, 4)}, "not in the SSE-H checkpoint"),
    ({"model.norm.weight": torch.ones(7)}, r"model\.norm\.weight \(7,\) != \(128,\)"),
    ({"model.layers.0.attn.q_proj.weight": torch.zeros(128, 128)}, r"whole layers; missing .*k_proj"),
], ids=["unknown-name", "wrong-shape", "half-a-layer"])
def test_bad_update_raises_before_touching_the_model(engine, prompts, weights, message):
    before = greedy(engine, prompts[:2], 8)
    with pytest.raises(ValueError, match=message):
        engine.collective_rpc("update_weights_from_tensors", args=(weights,))
    assert [c.tokens for c in greedy(engine, prompts[:2], 8)] == [c.tokens for c in before]
