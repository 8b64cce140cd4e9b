"""The vLLM SSE layer's contract with the shared SSE definitions, without an engine: the custom op takes the
features flat in `SSEFeatures`' order (the layer unpacks them into it), and the model declares the config's state
per tensor-parallel rank."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from sse_rl.models import SSEHConfig
from sse_rl.models.ops import SSEFeatures


def test_mixer_op_takes_the_features_in_their_order() -> None:
    from sse_rl.models.vllm import sse_layer

    params = list(inspect.signature(sse_layer._sse_h_mix).parameters)
    assert params == [*SSEFeatures._fields, "router_logits", "output", "layer_name"]
    assert list(inspect.signature(sse_layer._sse_h_mix_fake).parameters) == params


def test_model_declares_the_configs_state_per_rank() -> None:
    from sse_rl.models.vllm.model import SSEHForCausalLM

    config = SSEHConfig.from_preset("sse-h-tiny", num_sparse_partition=3, expand_v=0.5)
    vllm_config = SimpleNamespace(model_config=SimpleNamespace(hf_config=config),
                                  parallel_config=SimpleNamespace(tensor_parallel_size=2),
                                  cache_config=SimpleNamespace(mamba_ssm_cache_dtype="auto"))
    assert SSEHForCausalLM.get_mamba_state_shape_from_config(vllm_config) == ((4, 1, 64, 32),)
    assert SSEHForCausalLM.get_mamba_state_dtype_from_config(vllm_config) == (torch.float32,)
