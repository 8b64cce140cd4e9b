"""SSE-H configuration: SSE (GLA-based Sparse State Expansion) layers with a few full softmax-attention layers.

Field names follow fla's `SSEConfig` (fla-org/flash-linear-attention PR #882) where one exists, so checkpoints and
configs map over (see `convert.py`). fla's nested `attn` dict is flattened into `attn_*` fields, and fla's
`num_writer` / `num_reader` must be equal here (one `top_k` for both, as fla's default "varlen" path requires).
"""
from __future__ import annotations

import importlib
import math
import os
from typing import Any, ClassVar

import torch
from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

# RoPE scalings the attention layers implement (HF and vLLM alike); dynamic NTK and LongRoPE change with the
# sequence length at run time and are not among them.
ROPE_SCALING_TYPES = ("default", "linear", "llama3", "yarn")

# The recurrent state of an SSE layer is fp32 in training (ops, HF cache) and, by default, in the vLLM state cache.
# An engine may store it in bf16 instead (vLLM's mamba_ssm_cache_dtype, issue #27: half the state bytes a decode
# step moves); the ops still compute in fp32 and round the state once per stored step, which moves the engine's
# numerics away from training's (bench/mismatch.py --state-dtype measures by how much).
SSE_STATE_DTYPE = torch.float32
# The dtypes the ops take a stored state in (initial_state, the decode cache); a bf16 state is returned in bf16.
SSE_STATE_DTYPES = (torch.float32, torch.bfloat16)


def sse_state_shape(num_sparse_partition: int, num_heads: int, head_k_dim: int,
                    head_v_dim: int) -> tuple[int, int, int, int]:
    """Per-sequence recurrent state of one SSE layer: [N+1, H, dk, dv] (docs/sse_layer.md, "State").

    Partition 0 is the shared one, 1 + i is sparse partition i; each head's state is K-major ([dk, dv], fla's
    layout, not the V-first one of vLLM's GDN layers). The ops, the HF cache and the vLLM state cache all hold
    this shape (after a leading sequence or slot dim); `SSEHConfig.sse_state_shape` gives it for a config.
    """
    return num_sparse_partition + 1, num_heads, head_k_dim, head_v_dim


# Preset name -> field overrides on top of the class defaults.
PRESETS: dict[str, dict[str, Any]] = {
    # docs/sse_layer.md "SSE-H-2B": 18 layers, [SSE x5, Attn] x3, SSE 10 heads x 256, MHA 20 heads x 128, n4k1.
    "sse-h-2b": {
        "vocab_size": 151936, "hidden_size": 2560, "num_hidden_layers": 18, "num_heads": 10, "head_dim": 256,
        "num_sparse_partition": 4, "num_writer": 1, "num_reader": 1, "attn_layers": [5, 11, 17], "attn_num_heads": 20,
        "attn_num_kv_heads": 20, "attn_head_dim": 128, "rope_theta": 10000.0, "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
    },
    # 107.8M parameters with a 1024-token vocabulary (106.2M without the embeddings): 14 layers of width 768,
    # [SSE x4, Attn] x2 + SSE x3, Attn; SSE 6 heads x 128, MHA 12 heads x 64. The one-GPU learning demo's size.
    "sse-h-small": {
        "vocab_size": 1024, "hidden_size": 768, "num_hidden_layers": 14, "num_heads": 6, "head_dim": 128,
        "num_sparse_partition": 4, "num_writer": 1, "num_reader": 1, "attn_layers": [4, 9, 13], "attn_num_heads": 12,
        "attn_num_kv_heads": 12, "attn_head_dim": 64, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    # A ~1.3M-parameter model for tests and CPU smoke runs; attention head_dim 32 because vLLM CPU rejects 16.
    "sse-h-tiny": {
        "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 4, "num_heads": 2, "head_dim": 64,
        "num_sparse_partition": 4, "num_writer": 1, "num_reader": 1, "attn_layers": [1], "attn_num_heads": 4,
        "attn_num_kv_heads": 4, "attn_head_dim": 32, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}


@strict
class SSEHConfig(PreTrainedConfig):
    """Configuration of an SSE-H causal LM. Build presets with `SSEHConfig.from_preset(name, **overrides)`."""

    model_type: ClassVar[str] = "sse_h"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    # Standard HF names for the attention layers' heads (used by HF/vLLM utilities that count KV heads).
    attribute_map: ClassVar[dict[str, str]] = {
        "num_attention_heads": "attn_num_heads",
        "num_key_value_heads": "attn_num_kv_heads",
    }

    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 4
    # SSE mixer: H heads of dk = head_dim, dv = head_dim * expand_v.
    num_heads: int = 2
    head_dim: int = 64
    expand_v: float = 1.0
    num_sparse_partition: int = 4  # N sparse partitions, plus 1 always-on shared partition
    num_writer: int = 1  # K = top-k partitions written per token
    num_reader: int = 1  # must equal num_writer (one top-k for write and read)
    use_output_gate: bool = True
    gate_low_rank_dim: int = 16
    gate_logit_normalizer: int = 16
    aux_loss_coef: float = 0.01  # weight of the per-layer router balance loss summed into `loss`
    # SwiGLU MLP: intermediate_size defaults to 256 * ceil(2/3 * hidden_ratio * hidden_size / 256), as in fla.
    hidden_ratio: int = 4
    intermediate_size: int | None = None
    norm_eps: float = 1e-6
    # Full softmax attention (MHA/GQA with RoPE) at these layer indices; every other layer is an SSE mixer.
    attn_layers: list[int] | None = None
    attn_num_heads: int = 4
    attn_num_kv_heads: int = 4
    attn_head_dim: int = 32
    # What converted Transformers need (`hybridize.py`): Qwen2's q/k/v bias, Llama's attention_bias (q/k/v and o),
    # Qwen3's per-head RMSNorm of q and k before RoPE.
    attn_qkv_bias: bool = False
    attn_o_bias: bool = False
    attn_qk_norm: bool = False
    rope_theta: float = 10000.0
    # RoPE frequency scaling of the attention layers as transformers' `rope_parameters` without rope_theta, e.g.
    # {"rope_type": "llama3", "factor": 32.0, ...}; None = plain RoPE. Types: see ROPE_SCALING_TYPES.
    attn_rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    # Derived from attn_layers ("linear_attention" / "full_attention"); transformers' caches read it.
    layer_types: list[str] | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.attn_layers = sorted(self.attn_layers or [])
        if self.intermediate_size is None:
            self.intermediate_size = 256 * math.ceil(self.hidden_size * self.hidden_ratio * 2 / 3 / 256)
        derived = ["full_attention" if i in self.attn_layers else "linear_attention"
                   for i in range(self.num_hidden_layers)]
        if self.layer_types is not None and list(self.layer_types) != derived:
            raise ValueError(f"layer_types={self.layer_types} disagrees with attn_layers={self.attn_layers}; "
                             "set attn_layers only (layer_types is derived from it)")
        self.layer_types = derived
        self._check_fields()
        super().__post_init__(**kwargs)

    def _check_fields(self) -> None:
        """Reject configurations the model cannot build, naming the field at fault."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "num_sparse_partition",
                     "num_writer", "num_reader", "gate_low_rank_dim", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_writer > self.num_sparse_partition:
            raise ValueError(f"num_writer (top-k) must be <= num_sparse_partition={self.num_sparse_partition}, "
                             f"got {self.num_writer}")
        if self.num_reader != self.num_writer:
            raise ValueError(f"num_reader must equal num_writer={self.num_writer} (one top-k for write and read), "
                             f"got {self.num_reader}")
        if self.expand_v <= 0 or not float(self.head_dim * self.expand_v).is_integer():
            raise ValueError(f"expand_v must be > 0 and make head_dim * expand_v an integer, got {self.expand_v}")
        bad = [i for i in self.attn_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"attn_layers has indices {bad} outside [0, num_hidden_layers={self.num_hidden_layers})")
        if self.attn_layers:
            for name in ("attn_num_heads", "attn_num_kv_heads", "attn_head_dim"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.attn_num_heads % self.attn_num_kv_heads:
                raise ValueError(f"attn_num_heads={self.attn_num_heads} must be a multiple of "
                                 f"attn_num_kv_heads={self.attn_num_kv_heads}")
            if self.attn_head_dim % 2:
                raise ValueError(f"attn_head_dim must be even for RoPE, got {self.attn_head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        rope_type = (self.attn_rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"attn_rope_scaling.rope_type must be one of {ROPE_SCALING_TYPES}, got {rope_type!r}")

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Also write the model's PyTorch code beside config.json and name it in `auto_map`, so that
        `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads without sse-rl
        (models/remote_code.py).

        Only the package's own class does this; the copy a checkpoint carries is saved by transformers' remote-code
        machinery, which copies its files itself. The package module is found by name, not imported by a statement,
        because transformers refuses remote code that imports a package the loading machine lacks (sse_rl).
        """
        if __name__.startswith("sse_rl."):
            remote_code = importlib.import_module("sse_rl.models.remote_code")
            self.auto_map = remote_code.write_remote_code(save_directory)
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def head_v_dim(self) -> int:
        """Value dimension dv of an SSE head."""
        return int(self.head_dim * self.expand_v)

    def sse_state_shape(self, tp_size: int = 1) -> tuple[int, int, int, int]:
        """Per-sequence state of one SSE layer on one of `tp_size` tensor-parallel ranks, which shard the heads."""
        if self.num_heads % tp_size:
            raise ValueError(f"SSE-H needs num_heads ({self.num_heads}) divisible by the tensor-parallel size "
                             f"({tp_size})")
        return sse_state_shape(self.num_sparse_partition, self.num_heads // tp_size, self.head_dim, self.head_v_dim)

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(PRESETS)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SSEHConfig:
        """Build a preset ("sse-h-2b", "sse-h-small", "sse-h-tiny"); keyword overrides replace preset fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {cls.preset_names()}")
        return cls(**{**PRESETS[name], **overrides})
