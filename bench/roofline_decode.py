"""Memory-traffic bound of a decode step: SSE-H-2B vs the Qwen3-1.7B-shaped Transformer and the GDN hybrid (no GPU).

    python -m bench.roofline_decode   # bench/results/vllm_throughput.json -> bench/results/decode_roofline.md
    python -m bench.roofline_decode --out DIR   # the report to DIR/decode_roofline.md instead
    python -m bench.roofline_decode --results R.json --copy-bw 4200 --out DIR   # another run, another card

Why: at these batch sizes a decode step moves far more bytes than its FLOPs would take, so the ratio of bytes each model
must move per step bounds the throughput ratio the issue asks for (1.5x at 64 x 8k), and the share of copy bandwidth a
row achieves says how much of its step is something else (launches, kernels below bandwidth). Per step and sequence
SSE-H reads and writes the touched (K+1 of N+1) state partitions of every SSE layer (fp32, or bf16 in the `:state-bf16`
row) and reads the KV cache of its few attention layers; the GDN hybrid reads and writes the whole conv window and
recurrent state of every GDN layer (in the dtype its row ran with) and reads the KV cache of its attention layers; the
Transformer reads the KV cache of all its layers; each reads its weights once per step (all parameters but the input
embedding, unless it is tied to the LM head). Contexts are averaged over the generation (prompt + new/2). The measured
tokens/s of the results then give each model's achieved bytes/s; rows appear only for what the results hold.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.bench_vllm_throughput import PROMPT_LEN, memory_per_sequence, write_config
from bench.common import DECODE_MODELS, GDN_PEER, MODELS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BF16 = 2
H100_COPY_BW = 3002e9  # measured copy bandwidth of the H100 (bench/results/sse_ops_h100.md)
# The rows compared with SSE-H's for issue #27: the GDN hybrid, each recurrent-state dtype.
GDN_MODELS = tuple(name for name, model in DECODE_MODELS.items() if model.shape == GDN_PEER)


def weight_bytes(config: dict) -> int:
    """bf16 bytes of the parameters a decode step reads (the input embedding is a gather, unless tied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import sse_rl.models  # noqa: F401  (registers sse_h)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    params = sum(p.numel() for p in model.parameters())
    if not config.get("tie_word_embeddings"):
        params -= model.get_input_embeddings().weight.numel()
    return params * BF16


def step_bytes(config: dict, batch: int, context: int, ssm_cache_dtype: str = "auto") -> dict[str, float]:
    """Bytes one decode step moves for `batch` sequences at `context` tokens, by kind. `ssm_cache_dtype`: the
    engine's (the recurrent-state dtype of a GDN model or of SSE-H, `DecodeModel.ssm_cache_dtype`)."""
    state, kv = memory_per_sequence(config, context, ssm_cache_dtype)
    if config["model_type"] == "sse_h":
        touched = (config["num_writer"] + 1) / (config["num_sparse_partition"] + 1)
        state = 2 * touched * state  # read + write of the touched partitions (in the engine's state dtype)
    else:
        state = 2 * state  # read + write: a GDN step updates its whole conv window and recurrent state
    return {"weights": weight_bytes(config), "state": batch * state, "kv": batch * kv}


def peer_comparison(where: str, fraction: dict[str, float], tok_s: dict[str, float]) -> list[str]:
    """Issue #27's check against the GDN hybrid, one line per GDN row measured beside SSE-H: does SSE-H move its
    step's bytes at least as large a fraction of copy bandwidth as vLLM's GDN path moves its own, and the raw
    throughput ratio. Fractions of one run share the copy bandwidth, so their ratio does not depend on it."""
    sse = MODELS[0]
    return [f"- {where}: {sse} at {fraction[sse]:.0%} of copy bandwidth, {peer} at {fraction[peer]:.0%} "
            f"({fraction[sse] / fraction[peer]:.2f}x; at least as efficient: "
            f"{'met' if fraction[sse] >= fraction[peer] else 'NOT met'}); raw tok/s {sse} / {peer} = "
            f"{tok_s[sse] / tok_s[peer]:.2f}x" for peer in GDN_MODELS if sse in fraction and peer in fraction]


def shown(path: Path) -> str:
    """`path` as the report names it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def table(measured: dict, copy_bw: float) -> tuple[list[str], dict[tuple[str, str], dict[str, float]]]:
    """The report's rows, and per (model, setting) its bound tok/s, fraction of copy bandwidth and measured tok/s."""
    with tempfile.TemporaryDirectory() as tmp:
        configs = {name: write_config(name, Path(tmp) / name) for name in DECODE_MODELS}
    rows, stats = [], {}
    for r in measured["results"]:
        context = PROMPT_LEN + r["new_tokens"] // 2
        parts = step_bytes(configs[r["model"]], r["num_prompts"], context, DECODE_MODELS[r["model"]].ssm_cache_dtype)
        total = sum(parts.values())
        bound = r["num_prompts"] * copy_bw / total  # tokens/s if every step ran at copy bandwidth
        achieved = total * r["output_tokens_per_s"] / r["num_prompts"]  # bytes/s implied by the measurement
        stats[(r["model"], r["setting"])] = {"bound": bound, "fraction": achieved / copy_bw,
                                            "tok_s": r["output_tokens_per_s"]}
        rows.append(f"| {r['model']} | {r['setting']} | {r['num_prompts']} | {context:,} | "
                    f"{parts['weights'] / 1e9:.2f} | {parts['state'] / 1e9:.2f} | {parts['kv'] / 1e9:.2f} | "
                    f"{total / 1e9:.2f} | {bound:,.0f} | "
                    f"{r['output_tokens_per_s']:,.0f} | {achieved / 1e12:.2f} ({achieved / copy_bw:.0%}) |")
    return rows, stats


def peer_section(stats: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    """The comparison with the GDN hybrid, per setting where it was measured (nothing when it was not)."""
    lines = []
    for setting in dict.fromkeys(s for _, s in stats):
        of = {m: v for (m, s), v in stats.items() if s == setting}
        lines += peer_comparison(setting, {m: v["fraction"] for m, v in of.items()},
                                 {m: v["tok_s"] for m, v in of.items()})
    if not lines:
        return []
    return ["", "## Against the GDN hybrid (issue #27: SSE-H moves its bytes at least as efficiently)", "",
            "Fraction of copy bandwidth each step achieves (bytes per step x measured steps/s), same run; the "
            f"GDN rows count its conv and recurrent states read and written ({', '.join(GDN_MODELS)}: recurrent "
            "state in bf16, vLLM's default, and in fp32 as SSE-H keeps its states).", "", *lines]


def report(measured: dict, results: Path, copy_bw: float, copy_source: str) -> list[str]:
    """The markdown report of one throughput results file."""
    rows, stats = table(measured, copy_bw)
    gdn = any(m in GDN_MODELS for m, _ in stats)
    lines = [
        f"# Decode memory-traffic bound: SSE-H-2B vs Qwen3-1.7B-shape{' and a GDN hybrid' if gdn else ''} "
        "(bench/roofline_decode.py)", "",
        f"Measured runs: {measured['device']}, vLLM {measured['vllm']} ({shown(results)}); copy "
        f"bandwidth {copy_bw / 1e9:,.0f} GB/s ({copy_source}). GB per decode step at the average context; the bound "
        "is tokens/s if every step moved its bytes at copy bandwidth; achieved = bytes per step x measured steps/s "
        "(prefill and ramp-up included in the measurement, so a slight underestimate).", "",
        f"| model | setting | batch | avg context | weights GB | {'recurrent' if gdn else 'SSE'} state GB (r+w) | "
        "KV GB | total GB | bound tok/s | measured tok/s | achieved TB/s (of copy bw) |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    if (MODELS[0], "64x8k") in stats and (MODELS[1], "64x8k") in stats:
        ratio = stats[(MODELS[0], "64x8k")]["bound"] / stats[(MODELS[1], "64x8k")]["bound"]
        lines += ["", f"At 64 x 8k the bound ratio SSE-H / Qwen is **{ratio:.2f}x**: the issue's 1.5x target is "
                  "reachable only with both models near the same fraction of bandwidth. `vllm_decode_profile.md` "
                  "splits one decode step of each model by kernel kind, which shows where SSE-H's step falls short."]
    return lines + peer_section(stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for decode_roofline.md")
    parser.add_argument("--results", type=Path, default=RESULTS / "vllm_throughput.json",
                        help="a bench_vllm_throughput results file")
    parser.add_argument("--copy-bw", type=float, metavar="GB/S",
                        help="the measured card's copy bandwidth (default: the H100's, 3,002 GB/s)")
    args = parser.parse_args()
    measured = json.loads(args.results.read_text())
    copy_bw, source = ((args.copy_bw * 1e9, "--copy-bw") if args.copy_bw else
                       (H100_COPY_BW, "bench/results/sse_ops_h100.md"))
    lines = report(measured, args.results, copy_bw, source)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_roofline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
