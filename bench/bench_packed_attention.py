"""A dense Transformer's training micro-batch on one packed row: transformers' SDPA vs flash varlen attention (GPU).

    python -m bench.bench_packed_attention    # bench/results/packed_attention.{json,md}

Why: `sse-rl sft` and `sse-rl distill` feed a dense teacher padding-free packed rows, and transformers' SDPA path
attends over such a row with a dense block-diagonal [L, L] mask (every token pair computed); `models.hf_attention`
routes it through flash varlen attention instead. This measures what that buys on the conversion demo's teacher.

Choices:
- The teacher of scripts/hybrid_demo.sh: the `qwen3-100m` preset (97.1M parameters, GQA 12/4, q/k-norm), fp32
  master weights under bf16 autocast, as `sse-rl sft` trains it.
- Rows of the demo's token budgets (4,096: the distillation's; 16,384: the teacher's SFT) filled with sequences of
  62-112 tokens (uniform, fixed seed): the range of the arithmetic task's training examples as the chat template
  renders them (mean 84).
- Per implementation and row length: a forward and a backward of the token-mean cross-entropy (an SFT micro-batch
  without the optimizer), median wall ms of `--reps` after two warm-up calls, synchronized; peak memory of one call;
  and the two implementations' logits compared (max abs difference), so a fast wrong path cannot pass unseen.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import device_name, say, write_results
from sse_rl.init_model import preset_config
from sse_rl.models.hf_attention import VARLEN_ATTENTION, use_varlen_attention
from sse_rl.models.modeling import packed_position_ids

PRESET = "qwen3-100m"
LENGTH_RANGE = (62, 112)  # tokens of one arithmetic training example, chat template included
OUT = Path("bench/results/packed_attention")


def packed_row(total: int, vocab: int, device: str = "cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """One row of `total` tokens: whole sequences of LENGTH_RANGE tokens, the last one cut to fit, with the keys
    TRL's padding-free collator gives a batch."""
    g = torch.Generator().manual_seed(seed)
    lengths, used = [], 0
    while used < total:
        n = min(int(torch.randint(LENGTH_RANGE[0], LENGTH_RANGE[1] + 1, (1,), generator=g)), total - used)
        lengths.append(n)
        used += n
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": torch.randint(0, vocab, (1, total), generator=g).to(device),
            "position_ids": packed_position_ids(cu).to(device),
            "cu_seq_lens_q": cu.to(device), "cu_seq_lens_k": cu.to(device), "max_length_q": max(lengths),
            "max_length_k": max(lengths)}


def micro_batch(model: torch.nn.Module, row: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward and backward of the token-mean next-token loss under bf16 autocast; returns the logits."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(**row, use_cache=False).logits
    loss = F.cross_entropy(logits[0, :-1].float(), row["input_ids"][0, 1:])
    loss.backward()
    return logits.detach()


def measure(model: torch.nn.Module, row: dict[str, torch.Tensor], reps: int) -> tuple[float, float, torch.Tensor]:
    """Median ms of a micro-batch, its peak GiB, and its logits."""
    for _ in range(2):
        logits = micro_batch(model, row)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        micro_batch(model, row)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_packed_attention needs a CUDA GPU (flash varlen attention runs on CUDA only)")
    from transformers import AutoModelForCausalLM

    config = preset_config(PRESET)
    rows, table = [], []
    for length in args.lengths:
        row = packed_row(length, config.vocab_size)
        result = {"tokens": length, "sequences": int(row["cu_seq_lens_q"].numel() - 1)}
        logits = {}
        for implementation in ("sdpa", VARLEN_ATTENTION):
            torch.manual_seed(0)
            # a copy of the config each: switching a model's attention implementation writes into its config
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32,
                                                     attn_implementation="sdpa").cuda()
            if implementation == VARLEN_ATTENTION:
                assert use_varlen_attention(model, half_precision=True)
            assert model.config._attn_implementation == implementation
            ms, gib, logits[implementation] = measure(model, row, args.reps)
            result[implementation] = {"ms": ms, "peak_gib": gib, "tokens_per_s": length / ms * 1e3}
            say(f"{length} tokens, {implementation}: {ms:.1f} ms, {gib:.2f} GiB")
            del model
            torch.cuda.empty_cache()
        result["max_abs_logit_diff"] = float((logits["sdpa"].float() - logits[VARLEN_ATTENTION].float()).abs().max())
        result["speedup"] = result["sdpa"]["ms"] / result[VARLEN_ATTENTION]["ms"]
        rows.append(result)
        table.append(f"| {length:,} | {result['sequences']} | {result['sdpa']['ms']:.1f} | "
                     f"{result[VARLEN_ATTENTION]['ms']:.1f} | {result['speedup']:.2f}x | "
                     f"{result['sdpa']['peak_gib']:.2f} / {result[VARLEN_ATTENTION]['peak_gib']:.2f} | "
                     f"{result['max_abs_logit_diff']:.3f} |")
    meta = {"device": device_name(), "torch": torch.__version__, "preset": PRESET,
            "date": time.strftime("%Y-%m-%d"), "reps": args.reps}
    markdown = "\n".join([
        f"# {PRESET} training micro-batch on one packed row: SDPA vs flash varlen ({meta['device']}, "
        f"torch {meta['torch']}, {meta['date']})", "",
        "`bench/bench_packed_attention.py`: forward + backward of an SFT micro-batch (bf16 autocast, fp32 master "
        "weights), median of the timed reps; sequences of 62-112 tokens as in the arithmetic task.", "",
        "| row tokens | sequences | SDPA ms | varlen ms | speedup | peak GiB SDPA / varlen | max abs logit diff |",
        "|---|---|---|---|---|---|---|", *table, ""])
    write_results(args.out.with_suffix(".json"), {**meta, "results": rows}, markdown)
    say(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
