"""Launch settings of the SSE Triton kernels on one GPU: decode row block x tile width x warps, chunk kernels' warps
x stages.

    python -m bench.sweep_sse_kernels --out bench/results   # ~2 minutes on an H100, no autotuning

Why: the kernels launch with fixed settings (no autotune lists: autotuning costs minutes on a fresh machine), so
the fixed settings are chosen from this sweep at the 2B model's shapes (H=10, dk=dv=256, N=4, K=1, bf16):
- decode at batch 64 (row block BK x tile width BV x warps), states in a slot cache four times the batch (as
  vLLM's), fp32 or (`--state-dtype bfloat16`, issue #27's half-size state) bf16, as a fraction of copy bandwidth;
- each chunk kernel on a 13,056-token micro-batch (3 x 4,352 tokens, the GRPO bench's token budget) at
  num_warps in {4, 8} and num_stages in {1, 2, 3}, tiles BK = BV = 64 (smaller tiles crash the H100 with triton 3.6).
Results: `<out>/sse_kernel_launch.json` and `.md` (`sse_kernel_launch_state_bf16.*` for bf16 states); the chosen
settings are `decode.DECODE_BK/BV` (launched with Triton's default 4 warps) and `chunk.STAGES`.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from sse_rl.models.ops import chunk as C
from sse_rl.models.ops.decode import sse_decode_kernel
from sse_rl.models.ops.router import fused_router
from sse_rl.models.ops.routing import sort_by_partition, to_stream

from bench.common import bench_ms, copy_bandwidth, device_name, say, write_results

H, DK, DV, N, K = 10, 256, 256, 4, 1
DEV = "cuda"
BF16 = torch.bfloat16


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=DEV)


def sweep_decode(batch: int, bandwidth: float, state_dtype: torch.dtype) -> list[dict]:
    feats = [F.silu(rand(batch, H, DK)).to(BF16), rand(batch, H, DK).softmax(-1).to(BF16),
             F.silu(rand(batch, H, DK)).to(BF16), rand(batch, H, DK).softmax(-1).to(BF16),
             F.silu(rand(batch, H, DV)).to(BF16), F.logsigmoid(rand(batch, H, DK)) / 16,
             F.logsigmoid(rand(batch, H, DK)) / 16, rand(batch, N).to(BF16)]
    state = torch.zeros(4 * batch, N + 1, H, DK, DV, device=DEV, dtype=state_dtype)
    slots = torch.randperm(4 * batch, device=DEV)[:batch].int()
    out = torch.empty_like(feats[4])
    moved = batch * H * (K + 1) * DK * DV * state.element_size() * 2  # the touched partitions, read and written
    rows = []
    for bk in (8, 16, 32, 64):
        for bv in (32, 64, 128):
            for warps in (2, 4, 8):
                ms = bench_ms(partial(
                    sse_decode_kernel[(triton.cdiv(DV, bv), batch, H)], *feats, state, state.stride(0), slots, out,
                    DK ** -0.5, H=H, DK=DK, DV=DV, N=N, K=K, BK=bk, BV=bv, BN=triton.next_power_of_2(N),
                    num_warps=warps))
                rows.append({"batch": batch, "BK": bk, "BV": bv, "num_warps": warps, "ms": ms,
                             "fraction_of_copy_bw": moved / (ms / 1e3) / bandwidth})
                say(f"decode BK={bk} BV={bv} warps={warps}: {ms * 1e3:.0f} us, "
                    f"{rows[-1]['fraction_of_copy_bw']:.0%} of copy bw")
    return rows


def stream_inputs(lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """The chunk kernels' inputs as the SSE op builds them: the [shared | routed] stream and its segments."""
    L = sum(lengths)
    q_sh, q_sp, v = (F.silu(rand(L, H, d)).to(BF16) for d in (DK, DK, DV))
    k_sh, k_sp = (rand(L, H, DK).softmax(-1).to(BF16) for _ in range(2))
    g_sh, g_sp = (F.logsigmoid(rand(L, H, DK)) / 16 for _ in range(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEV)
    _, weights, indices = fused_router(rand(L, N).to(BF16), top_k=K)
    routing = sort_by_partition(indices, cu, N)
    q, k = to_stream(q_sh, q_sp, routing, weights), to_stream(k_sh, k_sp, routing, weights)
    return q, k, to_stream(v, v, routing), to_stream(g_sh, g_sp, routing), routing.seg_start, routing.seg_len


def sweep_chunk(lengths: list[int]) -> list[dict]:
    q, k, v, g, seg_start, seg_len = stream_inputs(lengths)
    chunk_off, table = C.chunk_table(seg_start, seg_len, q.shape[0])
    G, NC, scale = seg_len.numel(), table.shape[0], DK ** -0.5
    h, do = q.new_empty(NC, H, DK, DV), torch.randn_like(v)
    o, dh, dq, dk, dv, dg = (torch.empty_like(x) for x in (v, h, q, k, v, g))
    meta = {"H": H, "DK": DK, "DV": DV, "BT": C.BT, "BK": 64, "BV": 64, "PREC": "tf32"}
    walk, tiles = (16, G, H), (4, NC, H)  # the two grid kinds: per segment (state walk), per chunk
    kernels: dict[str, Callable[..., object]] = {
        "fwd_h": lambda **kw: C.chunk_fwd_h_kernel[walk](
            k, v, g, h, None, None, seg_start, seg_len, chunk_off, USE_H0=False, STORE_HT=False, **meta, **kw),
        "fwd_o": lambda **kw: C.chunk_fwd_o_kernel[tiles](q, k, v, g, h, o, table, scale, **meta, **kw),
        "bwd_dh": lambda **kw: C.chunk_bwd_dh_kernel[walk](
            q, do, g, dh, None, None, seg_start, seg_len, chunk_off, scale, USE_DHT=False, STORE_DH0=False,
            **meta, **kw),
        "bwd_dv": lambda **kw: C.chunk_bwd_dv_kernel[tiles](q, k, g, do, dh, dv, table, scale, **meta, **kw),
        "bwd_dqkg": lambda **kw: C.chunk_bwd_dqkg_kernel[tiles](
            q, k, v, g, h, do, dh, dq, dk, dg, table, scale, **meta, **kw),
    }
    rows = []
    for name, launch in kernels.items():
        for warps in (4, 8):
            for stages in (1, 2, 3):
                ms = bench_ms(partial(launch, num_warps=warps, num_stages=stages))
                rows.append({"kernel": name, "num_warps": warps, "num_stages": stages, "ms": ms})
                say(f"chunk {name} warps={warps} stages={stages}: {ms:.3f} ms")
    return rows


def markdown(result: dict) -> str:
    """The report, with a section for each part that was swept (`--parts`)."""
    lines = [f"# SSE kernel launch settings on {result['device']}", "",
             f"`bench/sweep_sse_kernels.py`, torch {result['torch']}, triton {result['triton']}; H=10, dk=dv=256, "
             f"N=4, K=1, bf16. Copy bandwidth {result['copy_bw_gbs']:,.0f} GB/s."]
    if result["decode"]:
        lines += ["", f"## Decode step, batch 64 (fraction of copy bandwidth for the touched {result['state_dtype']} "
                  "states, read + written)", "", "| BK | BV | warps | us | of copy bw |", "|---|---|---|---|---|"]
        lines += [f"| {r['BK']} | {r['BV']} | {r['num_warps']} | {r['ms'] * 1e3:.0f} | "
                  f"{r['fraction_of_copy_bw']:.0%} |" for r in result["decode"]]
    if result["chunk"]:
        lines += ["", f"## Chunk kernels, {result['tokens']:,} tokens (ms)", "",
                  "| kernel | 4 warps, 1 stage | 2 | 3 | 8 warps, 1 stage | 2 | 3 |", "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["kernel"] for r in result["chunk"]):
        times = [f"{r['ms']:.3f}" for r in result["chunk"] if r["kernel"] == name]
        lines.append(f"| {name} | {' | '.join(times)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--parts", nargs="+", choices=["decode", "chunk"], default=["decode", "chunk"])
    parser.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the decode state cache's dtype")
    args = parser.parse_args()
    lengths = [4352] * 3
    bandwidth = copy_bandwidth()
    result = {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bw_gbs": bandwidth / 1e9, "tokens": sum(lengths), "state_dtype": args.state_dtype,
              "decode": sweep_decode(64, bandwidth, getattr(torch, args.state_dtype)) if "decode" in args.parts
              else [],
              "chunk": sweep_chunk(lengths) if "chunk" in args.parts else []}
    name = "sse_kernel_launch" + ("_state_bf16" if args.state_dtype == "bfloat16" else "")
    write_results(args.out / f"{name}.json", result, markdown(result))


if __name__ == "__main__":
    main()
