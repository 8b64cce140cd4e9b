"""Benchmark of the SSE Triton kernels on one GPU (issue 3), written as JSON + a Markdown table.

Measures, in one run:
1. first-call compile time of each kernel group (run first, with an empty TRITON_CACHE_DIR for honest numbers);
2. the SSE op forward and forward+backward at T in {4k, 16k, 32k, 64k} (one sequence, H=10, dk=dv=256, N=4, K=1,
   bf16) against fla-core `chunk_gla` at the same H / head dims and causal SDPA with 20 heads of 128;
   fla's first call autotunes for about 7.5 minutes on an H100 (measured: 438 s); --skip-fla leaves it out;
3. the decode step at batch 1 / 64 / 256 against the bytes it must move (the fp32 state of the K+1 touched
   partitions, read and written), as a fraction of the measured device-to-device copy bandwidth.

Run:  TRITON_CACHE_DIR=$(mktemp -d) python -m bench.bench_sse_ops --out bench/results
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from sse_rl.models.ops.chunk import sse_triton
from sse_rl.models.ops.decode import sse_decode_triton
from sse_rl.models.ops.features import SSEFeatures
from sse_rl.models.ops.router import fused_router

from bench.common import bench_ms, copy_bandwidth, device_name, write_results

H, DK, DV, N, K = 10, 256, 256, 4, 1
ATTN_HEADS, ATTN_DIM = 20, 128
DTYPE = torch.bfloat16
DEV = "cuda"


def sync_time(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, device work included."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def sse_inputs(T: int, requires_grad: bool) -> list[torch.Tensor]:
    """One sequence of T tokens shaped like the SSE layer's features (silu / softmax_dk / logsigmoid/16)."""
    x = lambda *s: torch.randn(*s, device=DEV)
    feats = [F.silu(x(1, T, H, DK)), x(1, T, H, DK).softmax(-1), F.silu(x(1, T, H, DK)), x(1, T, H, DK).softmax(-1),
             F.silu(x(1, T, H, DV)), F.logsigmoid(x(1, T, H, DK)) / 16, F.logsigmoid(x(1, T, H, DK)) / 16,
             x(1, T, N)]
    return [f.to(DTYPE).requires_grad_(requires_grad) for f in feats]


def sse_op(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton SSE op on `sse_inputs` (seven features, then the router logits)."""
    return sse_triton(features=SSEFeatures(*inputs[:7]), router_logits=inputs[7], top_k=K)


def decode_op(feats: list[torch.Tensor], state: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One Triton decode step on `decode_inputs` (seven features, then the router logits)."""
    return sse_decode_triton(features=SSEFeatures(*feats[:7]), router_logits=feats[7], state=state, slot_ids=slots,
                             top_k=K)


def fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def decode_inputs(B: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    x = lambda *s: torch.randn(*s, device=DEV)
    feats = [F.silu(x(B, H, DK)), x(B, H, DK).softmax(-1), F.silu(x(B, H, DK)), x(B, H, DK).softmax(-1),
             F.silu(x(B, H, DV)), F.logsigmoid(x(B, H, DK)) / 16, F.logsigmoid(x(B, H, DK)) / 16, x(B, N)]
    state = torch.zeros(B, N + 1, H, DK, DV, device=DEV)
    return [f.to(DTYPE) for f in feats], state, torch.randperm(B, device=DEV)


def compile_times() -> dict[str, float]:
    """First call minus warm call, per kernel group, at the benchmark's constexprs (H, dims, N, K, dtype)."""
    inputs = sse_inputs(1000, requires_grad=True)
    logits = inputs[-1]
    stages: dict[str, Callable[[], object]] = {
        "router fwd": lambda: fused_router(logits.detach(), top_k=K),
        "router bwd": lambda: fused_router(logits, top_k=K)[1].sum().backward(),
        "chunk fwd (fwd_h + fwd_o)": lambda: sse_op(inputs),
        "chunk bwd (bwd_dh + bwd_dv + bwd_dqkg)": fwd_bwd(lambda: sse_op(inputs)[0], inputs),
    }
    feats, state, slots = decode_inputs(4)
    stages["decode"] = lambda: decode_op(feats, state, slots)
    out = {}
    for name, fn in stages.items():
        first = sync_time(fn)
        out[name] = round(first - min(sync_time(fn) for _ in range(3)), 3)
        print(f"compile {name}: {out[name]:.2f} s", flush=True)
    return out


def time_sse(T: int) -> dict:
    inputs = sse_inputs(T, requires_grad=True)

    def sse() -> torch.Tensor:
        return sse_op(inputs)[0]
    return {"sse_fwd_ms": bench_ms(sse), "sse_fwdbwd_ms": bench_ms(fwd_bwd(sse, inputs))}


def time_sdpa(T: int) -> dict:
    qkv = [torch.randn(1, ATTN_HEADS, T, ATTN_DIM, device=DEV, dtype=DTYPE, requires_grad=True) for _ in range(3)]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(*qkv, is_causal=True)
    return {"sdpa_fwd_ms": bench_ms(sdpa), "sdpa_fwdbwd_ms": bench_ms(fwd_bwd(sdpa, qkv))}


def time_gla(T: int, chunk_gla: Callable, first_call: bool) -> dict:
    qkvg = [x.detach().requires_grad_() for x in sse_inputs(T, False)[:4]]

    def gla() -> torch.Tensor:
        return chunk_gla(*qkvg)[0]
    row = {"gla_first_call_s": sync_time(fwd_bwd(gla, qkvg))} if first_call else {}
    return row | {"gla_fwd_ms": bench_ms(gla), "gla_fwdbwd_ms": bench_ms(fwd_bwd(gla, qkvg))}


def bench_training(lengths: list[int]) -> list[dict]:
    rows = []
    for T in lengths:
        row = {"T": T} | time_sse(T) | time_sdpa(T)
        row["sse_over_sdpa_fwdbwd"] = row["sse_fwdbwd_ms"] / row["sdpa_fwdbwd_ms"]
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_fla(rows: list[dict]) -> float:
    """Adds fla-core chunk_gla (same H, dims, bf16, one sequence) to the training rows; returns its first-call
    (autotune + compile) seconds."""
    from fla.ops.gla import chunk_gla
    for i, row in enumerate(rows):
        row |= time_gla(row["T"], chunk_gla, first_call=i == 0)
        row["sse_over_gla_fwdbwd"] = row["sse_fwdbwd_ms"] / row["gla_fwdbwd_ms"]
        torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
    return rows[0].pop("gla_first_call_s")


def time_decode(B: int) -> float:
    feats, state, slots = decode_inputs(B)
    return bench_ms(lambda: decode_op(feats, state, slots))


def bench_decode(batches: list[int], bw_gbs: float) -> list[dict]:
    rows = []
    for B in batches:
        ms = time_decode(B)
        moved = B * H * (K + 1) * DK * DV * 4 * 2  # fp32 state tiles of the K+1 touched partitions, in and out
        row = {"batch": B, "ms": ms, "state_bytes_moved": moved, "achieved_gbs": moved / ms / 1e6,
               "fraction_of_copy_bw": moved / ms / 1e6 / bw_gbs}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(res: dict) -> str:
    lines = [f"# SSE Triton kernels on {res['device']}", "",
             (f"torch {res['torch']}, triton {res['triton']}, fla-core {res.get('fla', 'not run')}; "
              f"SSE H={H}, dk=dv={DK}, N={N}, K={K}, bf16; SDPA {ATTN_HEADS}x{ATTN_DIM} causal. Times in ms (median)."),
             "", *[f"- {note}" for note in res.get("notes", [])],
             "", ("| T | SSE fwd | SSE fwd+bwd | GLA fwd | GLA fwd+bwd | SSE/GLA (fwd+bwd) | SDPA fwd | SDPA fwd+bwd "
                  "| SSE/SDPA (fwd+bwd) |"), "|---|---|---|---|---|---|---|---|---|"]
    f = lambda x: "-" if x is None else f"{x:.2f}"
    for r in res["training"]:
        lines.append(f"| {r['T']} | {f(r['sse_fwd_ms'])} | {f(r['sse_fwdbwd_ms'])} | {f(r.get('gla_fwd_ms'))} | "
                     f"{f(r.get('gla_fwdbwd_ms'))} | {f(r.get('sse_over_gla_fwdbwd'))} | {f(r['sdpa_fwd_ms'])} | "
                     f"{f(r['sdpa_fwdbwd_ms'])} | {f(r['sse_over_sdpa_fwdbwd'])} |")
    lines += ["", f"Decode step (copy bandwidth {res['copy_gbs']:.0f} GB/s, read + write):", "",
              "| batch | ms | state MB moved | GB/s | fraction of copy bw |", "|---|---|---|---|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['batch']} | {r['ms']:.4f} | {r['state_bytes_moved'] / 1e6:.1f} | "
                     f"{r['achieved_gbs']:.0f} | {r['fraction_of_copy_bw']:.2f} |")
    lines += ["", "First-call compile time (s, first call minus warm call):", "", "| kernels | s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["compile_s"].items()]
    return "\n".join(lines) + "\n"


def save(res: dict, out: Path, name: str) -> None:
    """Written after every section, so a run cut short still leaves its numbers."""
    write_results(out / f"{name}.json", res, markdown(res) if "training" in res else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--name", default="sse_ops_h100", help="file stem of the results")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768, 65536])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--skip-fla", action="store_true", help="no fla-core comparison (fla not installed)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    res: dict = {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR", "default (may be warm)")}
    res["compile_s"] = compile_times()
    save(res, args.out, args.name)
    res["copy_gbs"] = copy_bandwidth() / 1e9
    res["decode"] = bench_decode(args.batches, res["copy_gbs"])
    res["training"] = bench_training(args.lengths)
    save(res, args.out, args.name)
    if not args.skip_fla:
        import fla
        res["fla"] = fla.__version__
        res["compile_s"]["fla chunk_gla fwd+bwd (autotune, for reference)"] = bench_fla(res["training"])
        save(res, args.out, args.name)
    print(markdown(res))


if __name__ == "__main__":
    main()
