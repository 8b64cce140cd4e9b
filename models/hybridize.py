"""A pretrained dense Transformer (Llama, Qwen2/Qwen2.5, Qwen3) -> an SSE-H checkpoint (`sse-rl hybridize`).

The route of Mamba-in-the-Llama (arXiv 2408.15237) and LoLCATs (arXiv 2410.10254), as the first stage before
`sse-rl distill` (docs/hybridize.md):
- Embeddings, norms, MLPs and the LM head are the teacher's, unchanged.
- The layers in `attn_layers` stay softmax attention with the teacher's exact weights and semantics (GQA, q/k/v
  bias, o bias, q/k-norm, head_dim, RoPE with its scaling); with every layer kept, the result computes the teacher.
- Every other layer becomes an SSE layer (`SSEMixer`) with one SSE head per query head of the teacher and the
  teacher's head_dim; q/k/v/o are the teacher's projections, k and v repeated over each GQA group. What attention
  has and SSE does not (q/k/v biases, q/k-norm, RoPE) is dropped: SSE's feature maps (silu q, softmax k, silu v)
  and decays carry position instead, and the `align` stage of `sse-rl distill` fits the layer to what it replaced.
- The new parts start as a small perturbation of that: the LoRA B halves of the sparse partitions' q/k are zero (the
  sparse partitions read the shared partition's features, scaled by the router weight); the router keeps a small
  random init (near-uniform choice among partitions); the decay gates' B halves are zero and their biases give each
  head a fixed per-token decay, half-lives spread log-uniformly over DECAY_HALF_LIVES across heads (multi-scale
  memory, like RetNet's per-head decays), so each head starts as a retention head of one time scale and learns a
  data-dependent decay from there; the output gate keeps its small random init, so silu(gate) scales the new
  layer's output down and the converted model starts near the teacher without those attention layers' outputs
  rather than with a wrong one.
Unsupported teachers (MoE, sliding-window or MLA attention, encoder-decoder, other activations, RoPE types that
change with the sequence length, head dims outside the kernels' range) fail before anything is written, naming the
config field and its value. OUT_DIR is written through a temporary sibling directory and renamed at the end.
Which layers stay attention: evenly spaced by default; `auto:K` keeps the K layers whose attention reaches furthest
on calibration text (`lazy_ratios`), since the layers that retrieve distant tokens are the ones linear attention
replaces worst.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig

from sse_rl.models.configuration import ROPE_SCALING_TYPES, SSEHConfig
from sse_rl.models.modeling import SSEHForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
HEAD_DIM_RANGE = (32, 256)  # what the SSE kernels are tested at (tiles are 32-64 wide; sse-h-2b uses 256)
DECAY_HALF_LIVES = (16.0, 4096.0)  # tokens; the shortest and longest initial memory over the SSE heads
LAZY_SINK, LAZY_RECENT = 1, 8  # tokens: the first ones and the most recent ones (the query included) that a lazy
                               # layer's attention rests on
# Teacher config fields that mean a model this conversion cannot take: field -> why.
UNSUPPORTED_FIELDS = {
    "is_encoder_decoder": "encoder-decoder models have no decoder-only layer stack to convert",
    "num_experts": "mixture-of-experts MLPs", "num_local_experts": "mixture-of-experts MLPs",
    "n_routed_experts": "mixture-of-experts MLPs", "kv_lora_rank": "multi-head latent attention (MLA)",
    "use_sliding_window": "sliding-window attention", "mlp_bias": "MLP biases",
}


def default_attn_layers(num_layers: int) -> list[int]:
    """About 1 in 6 layers kept as attention, each the last of its group, as in the paper's 2B model (5/11/17 of
    18 layers)."""
    count = max(1, round(num_layers / 6))
    return [int((k + 1) * num_layers / count) - 1 for k in range(count)]


def parse_attn_layers(value: str | list[int] | None, num_layers: int) -> list[int]:
    """`--attn-layers`: None = the default placement, "all", or indices "1,5,9" / a list, each in [0, L).
    ("auto:K" needs the teacher and calibration text: `hybridize` resolves it with `auto_attn_layers`.)"""
    if value is None:
        return default_attn_layers(num_layers)
    if value == "all":
        return list(range(num_layers))
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--attn-layers: expected 'all', 'auto:K' or comma-separated layer indices, got "
                             f"{value!r}") from None
    bad = [i for i in value if not 0 <= i < num_layers]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"--attn-layers: {list(value)} must be distinct layer indices in [0, {num_layers}) "
                         f"(the teacher has {num_layers} layers); out of range: {bad}")
    return sorted(value)


def auto_count(value: str | list[int] | None, num_layers: int) -> int | None:
    """K of `--attn-layers auto:K` (1 <= K <= L), or None for any other value."""
    if not (isinstance(value, str) and value.startswith("auto:")):
        return None
    count = value.removeprefix("auto:")
    if not count.isdigit() or not 1 <= int(count) <= num_layers:
        raise ValueError(f"--attn-layers: {value!r} must be auto:K with 1 <= K <= {num_layers} (the teacher's "
                         "layers)")
    return int(count)


def read_calibration(path: str | Path | None) -> list[str]:
    """The `text` field of every row of a JSONL file: what `auto:K` runs the teacher on."""
    if path is None:
        raise ValueError("--calibration: --attn-layers auto:K ranks the teacher's layers on text; give a JSONL "
                         "file with a 'text' field per row")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--calibration: {path} does not exist")
    texts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"--calibration: {path} line {n} has no string 'text' field")
            texts.append(row["text"])
    if not texts:
        raise ValueError(f"--calibration: {path} has no rows")
    return texts


@torch.no_grad()
def lazy_ratios(model: torch.nn.Module, sequences: list[Tensor]) -> list[float]:
    """Per layer, the attention mass on the first LAZY_SINK and the last LAZY_RECENT tokens (LightTransfer's lazy
    ratio, arXiv 2410.13846), averaged over heads and over the query positions that have tokens beyond both. A
    layer near 1 only looks at the sink and its neighbours, which an SSE layer's decaying state also sees; a low one
    retrieves distant tokens, the job softmax attention does best. sequences: [T] token ids each."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns attention probabilities
    device = next(model.parameters()).device
    try:
        sums = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64, device=device)
        count = 0
        for ids in sequences:
            first = LAZY_SINK + LAZY_RECENT  # the first query position with a token outside both
            if ids.numel() <= first:
                continue
            probs = model(input_ids=ids[None].to(device), output_attentions=True).attentions  # L x [1, H, T, T]
            near = _lazy_mask(ids.numel(), probs[0].device)[first:]  # [T - first, T]
            for i, p in enumerate(probs):
                sums[i] += (p[0, :, first:] * near).sum(-1).mean(0).sum().double()
            count += ids.numel() - first
    finally:
        model.set_attn_implementation(implementation)
    if count == 0:
        raise ValueError(f"--calibration: every text is at most {LAZY_SINK + LAZY_RECENT} tokens long")
    return (sums / count).tolist()


def _lazy_mask(length: int, device: torch.device) -> Tensor:
    """[T, T] 1.0 where key j is a sink token (j < LAZY_SINK) or recent for query t (t - LAZY_RECENT < j <= t)."""
    t, j = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None]
    return ((j < LAZY_SINK) | ((j <= t) & (j > t - LAZY_RECENT))).float()


def auto_attn_layers(model: torch.nn.Module, tokenizer: Any, texts: list[str], count: int,
                     max_tokens: int = 1024) -> list[int]:
    """The `count` layers with the lowest lazy ratio on `texts` (each cut to `max_tokens`). The teacher's forwards
    run on the GPU where there is one (eager attention over up to 1,024 tokens per text: minutes on a CPU for a
    1.5B teacher), and the teacher goes back to where it was."""
    sequences = [torch.tensor(tokenizer(text)["input_ids"][:max_tokens]) for text in texts]
    home = next(model.parameters()).device
    try:
        ratios = lazy_ratios(model.to("cuda" if torch.cuda.is_available() else home), sequences)
    finally:
        model.to(home)
    return sorted(sorted(range(len(ratios)), key=ratios.__getitem__)[:count])


def check_teacher(config: PreTrainedConfig) -> None:
    """Raise naming the field and value when `config` is not a dense decoder-only Transformer this converts."""
    for name, why in UNSUPPORTED_FIELDS.items():
        value = getattr(config, name, None)
        if value:
            raise ValueError(f"teacher config has {name}={value!r} ({why}); hybridize converts dense decoder-only "
                             f"Transformers: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"teacher config has model_type={config.model_type!r}; hybridize converts "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"teacher config has layer_types with {sorted(kinds - {'full_attention'})}; only full "
                         "attention layers convert")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"teacher config has hidden_act={config.hidden_act!r}; SSE-H's MLP is SwiGLU (silu)")
    rope = rope_parameters(config)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"teacher config has partial_rotary_factor={rope['partial_rotary_factor']}; only full RoPE")
    if rope.get("rope_type", "default") not in ROPE_SCALING_TYPES:
        raise ValueError(f"teacher config has rope_parameters.rope_type={rope['rope_type']!r}; supported: "
                         f"{', '.join(ROPE_SCALING_TYPES)}")
    low, high = HEAD_DIM_RANGE
    dim = head_dim(config)
    if not low <= dim <= high or dim % 16:
        raise ValueError(f"teacher config has head_dim={dim}; SSE-H takes multiples of 16 in [{low}, {high}]")


def rope_parameters(config: PreTrainedConfig) -> dict[str, Any]:
    """transformers' standardised RoPE dict of the teacher (rope_type, rope_theta, scaling fields)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def head_dim(config: PreTrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def student_config(teacher: PreTrainedConfig, attn_layers: list[int], **overrides: Any) -> SSEHConfig:
    """The SSE-H config of the converted model: the teacher's shapes, SSE heads = its query heads of its head_dim.

    Overrides replace SSE-H fields (e.g. num_sparse_partition, num_writer/num_reader, gate_low_rank_dim); num_heads
    and head_dim may be regrouped only with num_heads * head_dim equal to the teacher's query width, since the
    teacher's projections are reused as they are.
    """
    rope = rope_parameters(teacher)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    dim, heads = head_dim(teacher), teacher.num_attention_heads
    bias = bool(getattr(teacher, "attention_bias", False))
    fields = {
        "vocab_size": teacher.vocab_size, "hidden_size": teacher.hidden_size,
        "num_hidden_layers": teacher.num_hidden_layers, "intermediate_size": teacher.intermediate_size,
        "norm_eps": teacher.rms_norm_eps, "max_position_embeddings": teacher.max_position_embeddings,
        "tie_word_embeddings": bool(teacher.tie_word_embeddings), "initializer_range": teacher.initializer_range,
        "num_heads": heads, "head_dim": dim, "attn_layers": attn_layers, "attn_num_heads": heads,
        "attn_num_kv_heads": teacher.num_key_value_heads, "attn_head_dim": dim,
        "attn_qkv_bias": teacher.model_type == "qwen2" or bias, "attn_o_bias": bias,
        "attn_qk_norm": teacher.model_type == "qwen3", "rope_theta": float(rope["rope_theta"]),
        "attn_rope_scaling": scaling if scaling.get("rope_type", "default") != "default" else None,
        "bos_token_id": teacher.bos_token_id, "eos_token_id": teacher.eos_token_id,
        "pad_token_id": getattr(teacher, "pad_token_id", None), **overrides,
    }
    if fields["num_heads"] * fields["head_dim"] != heads * dim:
        raise ValueError(f"num_heads * head_dim = {fields['num_heads']} * {fields['head_dim']} must equal the "
                         f"teacher's query width {heads} * {dim} (its q/k/v/o are reused as they are)")
    return SSEHConfig(**fields)


def repeat_kv(weight: Tensor, kv_heads: int, groups: int) -> Tensor:
    """A k/v projection [Hkv * d, D] with each head repeated over its GQA group: [Hkv * groups * d, D]."""
    return weight.unflatten(0, (kv_heads, -1)).repeat_interleave(groups, dim=0).flatten(0, 1)


def map_teacher_weights(teacher: dict[str, Tensor], config: SSEHConfig) -> dict[str, Tensor]:
    """Teacher state dict (Llama/Qwen names) -> SSE-H names, for every weight the student takes from it."""
    out: dict[str, Tensor] = {"model.embeddings.weight": teacher["model.embed_tokens.weight"],
                              "model.norm.weight": teacher["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = teacher["lm_head.weight"]
    groups = config.attn_num_heads // config.attn_num_kv_heads
    for i in range(config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        out[dst + "attn_norm.weight"] = teacher[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = teacher[src + "post_attention_layernorm.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{dst}mlp.{proj}.weight"] = teacher[f"{src}mlp.{proj}.weight"]
        attn = {name.removeprefix(src + "self_attn."): w for name, w in teacher.items()
                if name.startswith(src + "self_attn.")}
        if i in config.attn_layers:
            out.update({f"{dst}attn.{name}": w for name, w in attn.items()})
            continue
        out[dst + "attn.q_proj.weight"] = attn["q_proj.weight"]
        out[dst + "attn.k_proj.weight"] = repeat_kv(attn["k_proj.weight"], config.attn_num_kv_heads, groups)
        out[dst + "attn.v_proj.weight"] = repeat_kv(attn["v_proj.weight"], config.attn_num_kv_heads, groups)
        out[dst + "attn.o_proj.weight"] = attn["o_proj.weight"]
    return out


def decay_bias(config: SSEHConfig) -> Tensor:
    """Bias [H * dk] of a decay gate whose zero B half gives head h a per-token decay with half-life t_h, log-spaced
    over DECAY_HALF_LIVES: log-decay = logsigmoid(b) / normalizer = log(0.5) / t_h."""
    low, high = DECAY_HALF_LIVES
    half_lives = torch.logspace(math.log10(low), math.log10(high), config.num_heads, dtype=torch.float64)
    keep = 0.5 ** (config.gate_logit_normalizer / half_lives)  # sigmoid(b) = decay ** normalizer
    return torch.logit(keep).float().repeat_interleave(config.head_dim)


def init_new_parts(model: SSEHForCausalLM) -> None:
    """The SSE layers' own parameters as a small perturbation of the reused attention weights (module docstring)."""
    config = model.config
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in config.attn_layers:
                continue
            mixer = layer.attn
            mixer.lora_q_proj[1].weight.zero_()
            mixer.lora_k_proj[1].weight.zero_()
            for gate in mixer.gk_proj:
                gate[1].weight.zero_()
                gate[1].bias.copy_(decay_bias(config))


def build_student(teacher: torch.nn.Module, attn_layers: list[int], seed: int = 0,
                  **overrides: Any) -> SSEHForCausalLM:
    """The SSE-H model converted from a loaded HF teacher (fp32, on the teacher's device)."""
    config = student_config(teacher.config, attn_layers, **overrides)
    torch.manual_seed(seed)
    student = SSEHForCausalLM(config)
    init_new_parts(student)
    mapped = map_teacher_weights({k: v.float() for k, v in teacher.state_dict().items()}, config)
    missing, unexpected = student.load_state_dict(mapped, strict=False)
    if unexpected:
        raise ValueError(f"teacher weights with no SSE-H place: {unexpected[:5]}")
    taken_from_teacher = [name for name in missing if not _is_new_sse_part(name, config)]
    if taken_from_teacher:
        raise ValueError(f"SSE-H weights the teacher did not provide: {taken_from_teacher[:5]}")
    return student


def _is_new_sse_part(name: str, config: SSEHConfig) -> bool:
    """Whether `name` is an SSE layer parameter that has no counterpart in attention (LoRA, gates, router, norm),
    or the LM head tied to the embeddings."""
    if name == "lm_head.weight":
        return config.tie_word_embeddings
    parts = name.split(".")
    return (len(parts) > 4 and parts[3] == "attn" and int(parts[2]) not in config.attn_layers
            and parts[4] not in ("q_proj", "k_proj", "v_proj", "o_proj"))


def hybridize(teacher: str | Path, out_dir: str | Path, attn_layers: list[int] | str | None = None, *,
              seed: int = 0, dtype: str = "float32", calibration: str | Path | None = None,
              **config_overrides: Any) -> Path:
    """Convert `teacher` (HF checkpoint dir or hub id) into an SSE-H checkpoint at `out_dir` (config, weights in
    `dtype`, the teacher's tokenizer with its chat template and generation config). Checks everything before
    writing; `out_dir` appears whole or not at all, and an existing non-empty `out_dir` is refused.
    `attn_layers="auto:K"` ranks the teacher's layers on the `text` rows of the JSONL file `calibration`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"OUT_DIR {out_dir} exists and is not empty; hybridize writes a new checkpoint only")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    config = load_teacher_config(teacher)
    check_teacher(config)
    count = auto_count(attn_layers, config.num_hidden_layers)
    texts = read_calibration(calibration) if count else []
    layers = default_attn_layers(config.num_hidden_layers) if count else parse_attn_layers(
        attn_layers, config.num_hidden_layers)
    student_config(config, layers, **config_overrides)  # fail on bad overrides before loading weights
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    if count:
        layers = auto_attn_layers(model.eval(), tokenizer, texts, count)
    student = build_student(model, layers, seed=seed, **config_overrides).to(getattr(torch, dtype))
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    _copy_generation_config(teacher, tmp)
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def is_missing_local_path(path: str) -> bool:
    """Whether `path` names no existing local directory and cannot be a hub id ('org/name'), so it fails here
    rather than as a hub look-up error."""
    return (path.startswith((".", "/", "~")) or path.count("/") != 1) and not Path(path).expanduser().exists()


def load_teacher_config(teacher: str | Path) -> PreTrainedConfig:
    """The teacher's config; a missing local path fails naming it (not as a hub look-up error)."""
    text = str(teacher)
    if is_missing_local_path(text):
        raise FileNotFoundError(f"teacher {text!r} is neither a local checkpoint directory nor a hub id "
                                "('org/name')")
    return AutoConfig.from_pretrained(text)


def _copy_generation_config(teacher: str | Path, out_dir: Path) -> None:
    """The teacher's sampling defaults and stop tokens travel with the checkpoint (vLLM reads them)."""
    try:
        GenerationConfig.from_pretrained(str(teacher)).save_pretrained(str(out_dir))
    except OSError:  # a teacher without generation_config.json
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sse-rl hybridize", description=__doc__.split("\n\n")[0])
    parser.add_argument("teacher", help="HF checkpoint dir or hub id of a Llama / Qwen2 / Qwen3 Transformer")
    parser.add_argument("out_dir", help="where to write the SSE-H checkpoint (must not exist or be empty)")
    parser.add_argument("--attn-layers", default=None,
                        help="layers kept as softmax attention: 'all', '5,11,17', or 'auto:K' = the K layers whose "
                             "attention reaches furthest on --calibration text (default: about 1 in 6, evenly)")
    parser.add_argument("--calibration", default=None,
                        help="JSONL file with a 'text' field per row, for --attn-layers auto:K")
    parser.add_argument("--num-sparse-partition", type=int, default=None, help="SSE sparse partitions N")
    parser.add_argument("--top-k", type=int, default=None, help="SSE partitions written and read per token")
    parser.add_argument("--num-heads", type=int, default=None, help="SSE heads (default: the teacher's q heads)")
    parser.add_argument("--head-dim", type=int, default=None, help="SSE head dim (default: the teacher's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="saved weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SSE layers' new parameters")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"num_sparse_partition": args.num_sparse_partition, "num_heads": args.num_heads,
                                   "head_dim": args.head_dim, "num_writer": args.top_k,
                                   "num_reader": args.top_k}.items() if v is not None}
    try:
        out = hybridize(args.teacher, args.out_dir, args.attn_layers, seed=args.seed, dtype=args.dtype,
                        calibration=args.calibration, **overrides)
    except (ValueError, OSError) as err:  # bad teacher, layers, overrides or OUT_DIR: the message names it
        parser.exit(2, f"sse-rl hybridize: error: {err}\n")
    config = SSEHConfig.from_pretrained(str(out))
    print(f"wrote {out}: SSE-H with attention at layers {config.attn_layers} of {config.num_hidden_layers}")
    return 0
