"""Where a vLLM decode step's time goes: SSE-H-2B vs the Qwen3-1.7B-shaped Transformer and the GDN hybrid (GPU).

    python -m bench.profile_vllm_decode    # bench/results/vllm_decode_profile.{json,md}

Why: the throughput bench (bench_vllm_throughput.py) gives one number per run; this one splits a steady decode
step into kernel kinds, so it shows which part of SSE-H's step falls short of the memory-traffic bound
(decode_roofline.md) and by how much.

Choices:
- Engines as in the throughput bench (random weights, bf16, CUDA graphs and torch.compile at vLLM's defaults,
  each model's engine options: bench.common.DECODE_MODELS, the GDN hybrid with either recurrent-state dtype),
  one process per model (an engine's GPU memory is only reliably freed when its process exits). 64 requests with
  prompts of `--context` random tokens (4,096: near the 64 x 8k run's average context of 4,224) are prefilled
  through `LLMEngine.step`; once every request has produced tokens, decode steps are timed (wall clock,
  synchronized), then a few more run under torch.profiler (CPU and CUDA activity).
- Kernels are grouped by name into kinds (the regular expressions of bench.common.KERNEL_KINDS). The report gives
  each kind's share of the profiler's kernel time, and that share of the measured wall time: on the H100 machines
  used, the profiler's kernel durations sum to only ~65 % of a GPU-bound step, with or without CUDA graphs (Qwen's
  FlashAttention would otherwise read its KV cache faster than the card's peak bandwidth), so its absolute
  times are not used as such.
- Bytes per step (weights, touched SSE states or GDN states read + written, KV cache) come from
  roofline_decode.step_bytes at the measured context, for the step's fraction of copy bandwidth (measured on the
  device unless `--copy-bw`); with the GDN hybrid beside SSE-H, the report ends with issue #27's comparison of
  those fractions (roofline_decode.peer_comparison).
- The JSON keeps one step's kernels in launch order (`step_trace`), to see what each layer launches.
- `--no-cuda-graphs` runs the same step with kernels launched one by one (host-bound wall time; the kernel list
  is the same as inside the graphs).
- `--compile-sizes 64` has Inductor compile the batch-64 step for its static shape, which vLLM does with
  max_autotune: every GEMM is timed against Triton templates and the fastest kept. The question it answers: do
  vLLM's cuBLAS GEMMs at 64 rows (far below copy bandwidth in the profile) leave time that autotuning recovers?
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.bench_vllm_throughput import autotune_label, write_config
from bench.common import (DECODE_MODELS, KERNEL_KINDS, OTHER_KIND, DecodeModel, copy_bandwidth, device_name,
                          kernel_kind, write_results)
from bench.roofline_decode import peer_comparison, step_bytes

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

BATCH = 64


def prefill(llm, context: int, new_tokens: int, vocab: int) -> None:
    """Add BATCH requests of `context` random tokens and step until every one has produced two tokens."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    for i in range(BATCH):
        ids = torch.randint(0, vocab, (context,), generator=gen).tolist()
        llm.llm_engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
    produced: dict[str, int] = {}
    while len(produced) < BATCH or min(produced.values()) < 2:
        for out in llm.llm_engine.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)


def compilation_config(args: argparse.Namespace) -> dict | None:
    """vLLM's compilation options of the flags: no CUDA graphs, and/or batch sizes that Inductor compiles for their
    static shape (vLLM then turns on max_autotune, so each GEMM picks the fastest of cuBLAS and Triton templates)."""
    config = {"cudagraph_mode": "NONE"} if args.no_cuda_graphs else {}
    if args.compile_sizes:
        config["compile_sizes"] = args.compile_sizes
    return config or None


def measure(model_dir: Path, model: DecodeModel, args: argparse.Namespace) -> dict:
    """Wall ms per decode step and kernel ms per step by kind and by name, for one model."""
    import torch
    from vllm import LLM

    steps = args.warmup + args.timed + args.profiled
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, seed=0,
              max_model_len=args.context + steps + 16, enable_prefix_caching=False, max_num_seqs=BATCH,
              gpu_memory_utilization=0.9, compilation_config=compilation_config(args), **model.engine)
    engine = llm.llm_engine
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prefill(llm, args.context, steps + 8, vocab)
    for _ in range(args.warmup):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.timed):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.timed
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.profiled):
            engine.step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    host: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            kernels[e.key][0] += e.self_device_time_total / 1e3 / args.profiled  # ms per step
            kernels[e.key][1] += e.count / args.profiled
        elif e.device_type == torch.autograd.DeviceType.CPU:
            host[e.key] += e.cpu_time_total / 1e3 / args.profiled  # ms per step, children included
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_kind[kernel_kind(name)] += ms
    async_scheduling = bool(engine.vllm_config.scheduler_config.async_scheduling)
    launches = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    per_step = round(len(launches) / args.profiled)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    top_host = sorted(host.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_ms": wall_ms, "busy_ms": sum(by_kind.values()), "by_kind": dict(by_kind),
            "async_scheduling": async_scheduling,
            "top_host_ops": [[name[:120], round(ms, 4)] for name, ms in top_host],
            "kernels_per_step": sum(c for _, c in kernels.values()),
            # One step's kernels in launch order (name, profiler us): which kernels each layer runs.
            "step_trace": [[e.name[:80], round(e.time_range.elapsed_us(), 2)] for e in launches[-per_step:]],
            "top_kernels": [[name[:120], round(ms, 4), round(count, 2)] for name, (ms, count) in top]}


def write_report(results: dict, meta: dict, out: Path) -> None:
    kinds = [k for k, _ in KERNEL_KINDS] + [OTHER_KIND]
    bw = meta["copy_bw"] / 1e9
    lines = [f"# One vLLM decode step at batch {BATCH}, context {meta['context']:,} ({meta['device']}, "
             f"vLLM {meta['vllm']}, torch {meta['torch']}{', no CUDA graphs' if meta['no_cuda_graphs'] else ''}"
             f"{autotune_label(meta)})",
             "", f"`bench/profile_vllm_decode.py`: wall ms per step over {meta['timed']} steps; kernels per step "
             f"from torch.profiler over {meta['profiled']} more. GB / step from roofline_decode.step_bytes; "
             f"bandwidth against copy bandwidth {bw:,.0f} GB/s.", "",
             "| model | wall ms | tok/s | GB / step | of copy bw | kernels / step | profiler kernel ms / step |",
             "|---|---|---|---|---|---|---|"]
    tok_s = {model: BATCH / r["wall_ms"] * 1e3 for model, r in results.items()}
    fraction = {model: sum(r["bytes"].values()) / 1e9 / (r["wall_ms"] / 1e3) / bw for model, r in results.items()}
    for model, r in results.items():
        lines.append(f"| {model} | {r['wall_ms']:.2f} | {tok_s[model]:,.0f} | "
                     f"{sum(r['bytes'].values()) / 1e9:.2f} | {fraction[model]:.0%} | {r['kernels_per_step']:.0f} | "
                     f"{r['busy_ms']:.2f} |")
    against_peer = peer_comparison(f"batch {BATCH}", fraction, tok_s)
    if against_peer:
        lines += ["", "Against the GDN hybrid (issue #27: SSE-H moves its bytes at least as efficiently):", "",
                  *against_peer]
    lines += ["", "Share of the profiler's kernel time by kind, and that share of the wall time (ms):", "",
              "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for model, r in results.items():
        shares = [r["by_kind"].get(k, 0.0) / r["busy_ms"] for k in kinds]
        cells = [f"{share:.0%} ({share * r['wall_ms']:.2f})" for share in shares]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for model, r in results.items():
        lines += ["", f"## {model}: costliest kernels (profiler ms and launches per step)", "",
                  "| kernel | ms | calls |", "|---|---|---|"]
        lines += [f"| `{name}` | {ms:.3f} | {count:g} |" for name, ms, count in r["top_kernels"]]
        lines += ["", f"## {model}: host ops, ms per step (CPU time with children; async scheduling "
                  f"{'on' if r['async_scheduling'] else 'off'})", "", "| op | ms |", "|---|---|"]
        lines += [f"| `{name}` | {ms:.3f} |" for name, ms in r["top_host_ops"][:12]]
    write_results(out / "vllm_decode_profile.json", {**meta, "results": results}, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--models", nargs="+", default=list(DECODE_MODELS), choices=list(DECODE_MODELS))
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens per request")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--timed", type=int, default=64)
    parser.add_argument("--profiled", type=int, default=8)
    parser.add_argument("--copy-bw", type=float, help="bytes/s of a device-to-device copy (default: measured)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="launch kernels one by one (the same kernels as inside the graphs; the wall time then "
                             "includes launch overhead)")
    parser.add_argument("--compile-sizes", nargs="+", type=int, default=[], metavar="N",
                        help=f"batch sizes Inductor compiles for their static shape with max_autotune (e.g. {BATCH}: "
                             "autotuned GEMMs of the timed step; start-up takes longer)")
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)  # internal: one model, results here
    args = parser.parse_args()

    import torch
    import vllm

    if not torch.cuda.is_available():
        raise SystemExit("profile_vllm_decode needs a CUDA GPU")
    if args.child_json:  # one model per process: an engine's GPU memory is only reliably freed at exit
        (model,) = args.models
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / DECODE_MODELS[model].shape
            config = write_config(model, model_dir)
            r = measure(model_dir, DECODE_MODELS[model], args)
        r["bytes"] = step_bytes(config, BATCH, args.context + args.warmup + args.timed // 2,
                                DECODE_MODELS[model].ssm_cache_dtype)
        args.child_json.write_text(json.dumps(r))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            child = Path(tmp) / f"{model}.json"
            cmd = [sys.executable, "-m", __spec__.name, "--models", model, "--child-json", str(child), "--context",
                   str(args.context), "--warmup", str(args.warmup), "--timed", str(args.timed), "--profiled",
                   str(args.profiled)] + (["--no-cuda-graphs"] if args.no_cuda_graphs else []) + (
                ["--compile-sizes", *map(str, args.compile_sizes)] if args.compile_sizes else [])
            subprocess.run(cmd, check=True)
            results[model] = json.loads(child.read_text())
            print(model, json.dumps({k: v for k, v in results[model].items() if not k.startswith("top")}),
                  flush=True)
    if args.copy_bw is None:
        args.copy_bw = copy_bandwidth()
    meta = {"device": device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
            "context": args.context, "timed": args.timed, "profiled": args.profiled, "copy_bw": args.copy_bw,
            "no_cuda_graphs": args.no_cuda_graphs, "compile_sizes": args.compile_sizes}
    write_report(results, meta, Path(args.out))


if __name__ == "__main__":
    main()
