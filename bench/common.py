"""What the bench scripts share: progress lines, GPU timing, the copy-bandwidth probe, the compared models' shapes,
kernel kinds of a profile, device names and the results writer (JSON + Markdown)."""
from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# do_bench's timing window per measurement (ms). 60 rather than 50: the launch-settings sweep separates settings a
# few percent apart, and the longer window costs the op bench well under a second in all.
REP_MS = 60
# The copy-bandwidth probe's buffer. 2 GiB rather than 1: a copy's fixed launch cost (microseconds) weighs half as
# much against a 1.4 ms copy as against a 0.7 ms one; either is far beyond the L2 cache (50-60 MB on an H100/H200).
COPY_BYTES = 2 * 1024**3

# The policies the benches compare, under the names the results files use.
MODELS = ("sse-h-2b", "qwen3-1.7b-shape")
# A GDN hybrid of SSE-H-2B's class (issue #27): vLLM's own recurrent-state path, decoded beside the two policies.
GDN_PEER = "qwen3-next-gdn-2b"

# Model shapes (random weights: only the shape matters). Each states whether its lm_head is tied to the input
# embeddings: a tied head counts once among the parameters and a decode step reads it once, and fsdp2 cannot shard
# it. An entry with a `preset` is that SSE-H preset (models/configuration.py), the rest are HF configs of their
# `model_type` (default qwen3).
SHAPES: dict[str, dict[str, Any]] = {
    "sse-h-2b": {"preset": "sse-h-2b", "tie_word_embeddings": False},
    "sse-h-tiny": {"preset": "sse-h-tiny", "tie_word_embeddings": False},
    # Qwen3-1.7B's published shape; its checkpoint ties the lm_head.
    "qwen3-1.7b-shape": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                         "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                         "head_dim": 128, "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
                         "tie_word_embeddings": True},
    # The same architecture at CPU size (plumbing checks).
    "qwen3-tiny-shape": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                         "rope_theta": 1_000_000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True},
    # Qwen3-Next's architecture (gated delta net with softmax attention at every 4th layer) at SSE-H-2B's size,
    # 1,912,256,896 parameters. vLLM has no dense text-only class of this family, and its Qwen3-Next class requires
    # an MoE layer: the last layer's MLP is 2 experts of 2,048 with top-2 beside a shared expert of 2,048, i.e. the
    # dense MLP's FLOPs and bytes. Not 2 x 3,072 without the shared one: vLLM (0.26 and 0.32) then appends the
    # shared-expert gate to the router's logits, and top-2 of those 3 columns can pick an expert that does not
    # exist. 32 value heads: vLLM 0.26's packed GDN decode crashed with 16. vLLM builds this class's lm_head untied
    # whatever the config says (more memory, the same bytes read per step).
    GDN_PEER: {"model_type": "qwen3_next", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
               "num_hidden_layers": 24, "full_attention_interval": 4, "num_attention_heads": 8,
               "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
               "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
               "num_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 2048,
               "shared_expert_intermediate_size": 2048, "decoder_sparse_step": 24, "rope_theta": 10_000_000.0,
               "max_position_embeddings": 40960, "tie_word_embeddings": True},
}
# The vLLM architecture of each HF model_type a shape may have.
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen3_next": "Qwen3NextForCausalLM"}


@dataclass(frozen=True)
class DecodeModel:
    """A model of the vLLM decode benches: its `SHAPES` entry and the engine options it needs beyond the settings
    all models share."""

    shape: str
    engine: dict[str, Any] = field(default_factory=dict)

    @property
    def ssm_cache_dtype(self) -> str:
        """vLLM's mamba_ssm_cache_dtype of this row's engine: a GDN model's recurrent-state dtype ("auto": the
        model's) or SSE-H's state dtype ("auto": fp32, the plugin's default)."""
        return self.engine.get("mamba_ssm_cache_dtype", "auto")


# The GDN peer's prefill takes vLLM's Triton kernels: the default on an H100 is FlashInfer's, not installed there.
_GDN_ENGINE = {"additional_config": {"gdn_prefill_backend": "triton"}}
# The models the vLLM decode benches compare, under the names their results use. The GDN peer runs twice: its
# recurrent state in the model dtype (vLLM's default) and in fp32, as SSE-H keeps its states by default. SSE-H-2B
# also runs with its states stored in bf16 (issue #27: half the state bytes of its decode step; the mismatch this
# costs is bench/mismatch.py --state-dtype bfloat16).
DECODE_MODELS: dict[str, DecodeModel] = {
    **{name: DecodeModel(name) for name in MODELS},
    f"{MODELS[0]}:state-bf16": DecodeModel(MODELS[0], {"mamba_ssm_cache_dtype": "bfloat16"}),
    GDN_PEER: DecodeModel(GDN_PEER, _GDN_ENGINE),
    f"{GDN_PEER}:state-fp32": DecodeModel(GDN_PEER, {**_GDN_ENGINE, "mamba_ssm_cache_dtype": "float32"}),
}

# Kernel name -> kind, for a profile's GPU time by kind. The first match wins (case-insensitive); no match: "other".
KERNEL_KINDS: tuple[tuple[str, str], ...] = (
    ("sse", r"\b(sse_decode|chunk_(fwd|bwd)_\w+|router_(fwd|bwd)|stream|pair_sum)_kernel\b"),  # models/ops kernels
    ("gdn", r"delta_rule|gdn|causal_conv1d|layer_norm_gated|l2norm"),  # vLLM's GDN layer: conv, state update, norms
    ("attention", r"flash|fmha|attn|attention|paged"),  # before matmul: fmha kernels are cutlass kernels
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|matmul|splitk|sm80_|sm90_|sm100_|^triton_tem_"),  # tem: Inductor GEMMs
    ("fused elementwise (Inductor)", r"^triton_"),
    ("sampling/softmax/sort", r"sample|topk|top_k|argmax|gumbel|exponential|softmax|logsumexp|sort"),
    ("communication", r"nccl"),  # before elementwise: its kernels are named AllReduce, ReduceScatter, ...
    ("elementwise/copy", r"elementwise|vectorized|reduce|copy|cat|index|scatter|gather|fill|scan|cumsum|where|memcpy"
                         r"|memset"),
)
OTHER_KIND = "other"

_START = time.perf_counter()


def say(msg: str) -> None:
    """A progress line with the clock and the seconds since start, so a run cut off by a time limit shows where it
    was."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _START:6.0f}s] {msg}", flush=True)


def bench_ms(fn: Callable[[], object], rep: int = REP_MS) -> float:
    """Median ms of one call of `fn` on the GPU: Triton's do_bench (CUDA events, L2 flushed before each call)."""
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting the bytes read plus the bytes written."""
    import torch

    src = torch.empty(COPY_BYTES // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / (bench_ms(lambda: dst.copy_(src)) / 1e3)


def model_config(name: str, **overrides: Any) -> Any:
    """The HF config of `SHAPES[name]` with `overrides` on top (token ids, lengths, an untied head)."""
    from transformers import AutoConfig

    from sse_rl.models import SSEHConfig

    fields = {**SHAPES[name], **overrides}
    preset = fields.pop("preset", None)
    if preset is None:
        model_type = fields.pop("model_type", "qwen3")
        return AutoConfig.for_model(model_type, **fields, architectures=[ARCHITECTURES[model_type]])
    config = SSEHConfig.from_preset(preset, **fields)
    config.architectures = ["SSEHForCausalLM"]
    return config


def kernel_kind(name: str) -> str:
    """The kind of a GPU kernel by its name (`KERNEL_KINDS`, in order)."""
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, name, re.IGNORECASE)), OTHER_KIND)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo where there is one)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor())


def device_name() -> str:
    """The device a result was measured on: the GPU's name, or the CPU's where there is no GPU."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()


def write_results(path: Path, data: dict[str, Any], markdown: str | None = None) -> None:
    """`data` as JSON at `path` and, given `markdown`, the report beside it (same stem, `.md`); folders are made.
    One-space indent: kernel traces and sweep rows run to thousands of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    if markdown is not None:
        path.with_suffix(".md").write_text(markdown)
