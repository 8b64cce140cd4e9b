"""Decode throughput in vLLM: SSE-H-2B against a Qwen3-1.7B-shaped Transformer and a GDN hybrid (GPU).

Run on one GPU (the issue's numbers: one H100, vLLM 0.26), from the repo root with sse-rl installed:
    python -m bench.bench_vllm_throughput                  # writes bench/results/vllm_throughput.{json,md}

Choices:
- Random weights through vLLM's `load_format="dummy"`: only config.json is written, so no multi-GB checkpoint.
  Prompts are random token ids and the tokenizer is skipped; `ignore_eos` makes every request run to max_tokens.
- Settings (the issue's): 64 prompts x 128 tokens generating 8,192 tokens each; then 32,768 tokens each with as
  many prompts as fit, i.e. vLLM's own maximum concurrency for the KV/state pool of that engine.
- One child process per model and setting, its engine in that process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, so the
  bench can ask the scheduler for that concurrency): an engine's GPU memory is only reliably freed when its process
  exits (on the H200 a second engine in the same process found 125 of 140 GiB still held and refused to start).
  bf16, prefix caching off, CUDA graphs and torch.compile at vLLM's defaults.
- Throughput = generated tokens / wall time of one `generate` call over all prompts (prefill included), after a
  short warm-up generate on the same engine.
- `--compile-sizes N ...` (both models alike): Inductor compiles those batch sizes for their static shape, with
  max_autotune, so each GEMM is the fastest of cuBLAS and Triton templates at that batch.
- The GDN hybrid (bench.common.GDN_PEER, issue #27) is vLLM's own Qwen3-Next class at SSE-H-2B's size: the same
  settings, plus Triton GDN prefill kernels (`additional_config`), and it runs twice: its recurrent state in bf16
  (vLLM's default) and in fp32 (`mamba_ssm_cache_dtype="float32"`, as SSE-H keeps its states), rows
  `qwen3-next-gdn-2b` and `qwen3-next-gdn-2b:state-fp32`. On vLLM 0.26 its first generate took minutes (Triton
  autotune): a fresh machine's first run of it is slow to start.
- Memory per sequence is reported analytically from the configs: SSE states (fp32, fixed size), GDN states (the
  conv window in bf16 and the recurrent state in the engine's dtype, per linear layer) and the KV cache of the
  softmax-attention layers (bf16) at the setting's full length.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import DECODE_MODELS, MODELS, DecodeModel, device_name, model_config, write_results

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPT_LEN = 128
BF16_BYTES = 2
# Bytes per element of a GDN recurrent state by vLLM's mamba_ssm_cache_dtype ("auto": the model's, bf16 here).
SSM_BYTES = {"auto": BF16_BYTES, "bfloat16": BF16_BYTES, "float32": 4}


@dataclass
class Setting:
    name: str
    new_tokens: int
    num_prompts: int | None  # None: as many as fit


SETTINGS = [Setting("64x8k", 8192, 64), Setting("fit-32k", 32768, None)]


@dataclass
class Result:
    model: str
    setting: str
    num_prompts: int
    new_tokens: int
    seconds: float
    output_tokens_per_s: float
    state_bytes_per_seq: int
    kv_bytes_per_seq: int


def write_config(model: str, out: Path) -> dict:
    """config.json of one of `DECODE_MODELS` for a dummy-weight engine, with positions for the longest setting."""
    config = model_config(DECODE_MODELS[model].shape)
    longest = PROMPT_LEN + max(s.new_tokens for s in SETTINGS)
    config.max_position_embeddings = max(config.max_position_embeddings, longest)
    config.save_pretrained(str(out))
    return config.to_dict()


def memory_per_sequence(config: dict, tokens: int, ssm_cache_dtype: str = "auto") -> tuple[int, int]:
    """(recurrent-state bytes, KV-cache bytes) one sequence of `tokens` tokens holds. `ssm_cache_dtype` is the
    engine's mamba_ssm_cache_dtype, which a GDN model's recurrent state and SSE-H's states follow (`DecodeModel`;
    SSE-H: fp32 unless "bfloat16")."""
    if config["model_type"] == "sse_h":
        attn = len(config["attn_layers"])
        dv = int(config["head_dim"] * config["expand_v"])
        state_bytes = BF16_BYTES if ssm_cache_dtype == "bfloat16" else 4
        state = (config["num_sparse_partition"] + 1) * config["num_heads"] * config["head_dim"] * dv * state_bytes
        kv = 2 * config["attn_num_kv_heads"] * config["attn_head_dim"] * BF16_BYTES * tokens
        return (config["num_hidden_layers"] - attn) * state, attn * kv
    kv = 2 * config["num_key_value_heads"] * config["head_dim"] * BF16_BYTES * tokens
    if config["model_type"] == "qwen3_next":
        attn = config["layer_types"].count("full_attention")
        return (config["num_hidden_layers"] - attn) * sum(gdn_state_bytes(config, ssm_cache_dtype)), attn * kv
    return 0, config["num_hidden_layers"] * kv


def gdn_state_bytes(config: dict, ssm_cache_dtype: str) -> tuple[int, int]:
    """(conv-state bytes, recurrent-state bytes) of one sequence in one GDN layer, as vLLM allocates them: the
    causal conv keeps its last kernel-1 inputs of q, k and v in the model dtype, the delta rule one [dv, dk] matrix
    per value head in `ssm_cache_dtype`."""
    conv_dim = 2 * config["linear_num_key_heads"] * config["linear_key_head_dim"] + (
        config["linear_num_value_heads"] * config["linear_value_head_dim"])
    conv = conv_dim * (config["linear_conv_kernel_dim"] - 1) * BF16_BYTES
    recurrent = config["linear_num_value_heads"] * config["linear_value_head_dim"] * config["linear_key_head_dim"]
    return conv, recurrent * SSM_BYTES[ssm_cache_dtype]


def max_concurrency(llm) -> int:
    """vLLM's own count of requests of max_model_len that fit in this engine's KV/state pool."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    return int(get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, scheduler.kv_cache_config))


def run_setting(model_dir: Path, model: DecodeModel, setting: Setting,
                args: argparse.Namespace) -> tuple[int, float]:
    """(number of prompts, seconds) of one timed generate call."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, seed=0,
              max_model_len=PROMPT_LEN + setting.new_tokens, enable_prefix_caching=False,
              max_num_seqs=setting.num_prompts or args.max_fit_prompts,
              gpu_memory_utilization=args.gpu_memory_utilization, disable_log_stats=not args.progress,
              compilation_config={"compile_sizes": args.compile_sizes} if args.compile_sizes else None,
              **model.engine)
    num_prompts = setting.num_prompts or min(max_concurrency(llm), args.max_fit_prompts)
    gen = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 150_000, (PROMPT_LEN,), generator=gen).tolist())
               for _ in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=setting.new_tokens, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == num_prompts * setting.new_tokens, f"expected {num_prompts * setting.new_tokens}, got {produced}"
    return num_prompts, seconds


def autotune_label(meta: dict) -> str:
    """The report title's note of `--compile-sizes` (empty without it, and for older results files)."""
    sizes = meta.get("compile_sizes")
    return f", Inductor max-autotune at batch {', '.join(map(str, sizes))}" if sizes else ""


def write_report(results: list[Result], out_dir: Path, meta: dict) -> None:
    lines = [f"# vLLM decode throughput ({meta['device']}, vLLM {meta['vllm']}, torch {meta['torch']}, bf16"
             f"{autotune_label(meta)})", "",
             "| model | setting | prompts | new tokens | s | output tok/s | state MiB/seq | KV MiB/seq |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.model} | {r.setting} | {r.num_prompts} | {r.new_tokens} | {r.seconds:.1f} | "
                     f"{r.output_tokens_per_s:,.0f} | {r.state_bytes_per_seq / 2**20:.1f} | "
                     f"{r.kv_bytes_per_seq / 2**20:.1f} |")
    for setting in SETTINGS:  # each SSE-H-2B row (state dtypes) against each model of another shape
        by_model = {r.model: r.output_tokens_per_s for r in results if r.setting == setting.name}
        sse = [name for name in by_model if DECODE_MODELS[name].shape == MODELS[0]]
        lines += [f"\n{setting.name}: {name} / {other} = {by_model[name] / tok_s:.2f}x" for name in sse
                  for other, tok_s in by_model.items() if DECODE_MODELS[other].shape != MODELS[0]]
    write_results(out_dir / "vllm_throughput.json", {**meta, "results": [asdict(r) for r in results]},
                  "\n".join(lines) + "\n")
    print("\n".join(lines))


def child_command(args: argparse.Namespace, model: str, setting: str, child_json: Path) -> list[str]:
    """This script's command line for one model and setting, run in its own process."""
    return [sys.executable, "-m", __spec__.name, "--models", model, "--settings", setting, "--child-json",
            str(child_json), "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--max-fit-prompts",
            str(args.max_fit_prompts)] + (["--progress"] if args.progress else []) + (
        ["--compile-sizes", *map(str, args.compile_sizes)] if args.compile_sizes else [])


def run_child(args: argparse.Namespace) -> Result:
    """The one model and setting of a child process: write its config, time the generate call."""
    (model,), (name,) = args.models, args.settings
    setting = next(s for s in SETTINGS if s.name == name)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / DECODE_MODELS[model].shape
        config = write_config(model, model_dir)
        num_prompts, seconds = run_setting(model_dir, DECODE_MODELS[model], setting, args)
    state, kv = memory_per_sequence(config, PROMPT_LEN + setting.new_tokens, DECODE_MODELS[model].ssm_cache_dtype)
    return Result(model, setting.name, num_prompts, setting.new_tokens, seconds,
                  num_prompts * setting.new_tokens / seconds, state, kv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results", help="folder for vllm_throughput.{json,md}")
    parser.add_argument("--models", nargs="+", default=list(DECODE_MODELS), choices=list(DECODE_MODELS))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-fit-prompts", type=int, default=1024, help="cap of the 'as many as fit' setting")
    parser.add_argument("--progress", action="store_true",
                        help="log vLLM's running generation throughput every 10 s (a run cut off by a time limit "
                             "still shows its pace; costs some host work per step, so not for the reported rows)")
    parser.add_argument("--settings", nargs="+", default=[s.name for s in SETTINGS],
                        choices=[s.name for s in SETTINGS], help="run only these settings")
    parser.add_argument("--compile-sizes", nargs="+", type=int, default=[], metavar="N",
                        help="batch sizes Inductor compiles for their static shape, which vLLM does with "
                             "max_autotune (autotuned GEMMs, e.g. 64 for the 64 x 8k setting; longer start-up)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="write one report from the results files of earlier (partial) runs, run nothing")
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)  # internal: one model and setting
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = [Result(**r) for part in parts for r in part["results"]]
        write_report(results, Path(args.out), {k: v for k, v in parts[0].items() if k != "results"})
        return

    import torch
    import vllm

    if not torch.cuda.is_available():
        raise SystemExit("bench_vllm_throughput needs a CUDA GPU")
    if args.child_json:
        args.child_json.write_text(json.dumps(asdict(run_child(args))))
        return
    results, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for setting in args.settings:
                child = Path(tmp) / f"{model}-{setting}.json"
                if subprocess.run(child_command(args, model, setting, child)).returncode != 0:
                    failed.append(f"{model} {setting}")
                    print(f"bench_vllm_throughput: {model} {setting} failed (its output is above); going on",
                          flush=True)
                    continue
                results.append(Result(**json.loads(child.read_text())))
                print(results[-1], flush=True)
    meta = {"device": device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
            "prompt_len": PROMPT_LEN, "gpu_memory_utilization": args.gpu_memory_utilization,
            "compile_sizes": args.compile_sizes}
    write_report(results, Path(args.out), meta)  # what was measured is kept even when a run failed
    if failed:
        raise SystemExit(f"bench_vllm_throughput: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
