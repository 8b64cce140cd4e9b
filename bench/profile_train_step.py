"""Where a packed training micro-batch of a small SSE-H spends its time (GPU), to explain SFT/GRPO throughput.

    python bench/profile_train_step.py [--preset sse-h-small] [--tokens 4096] [--seq-len 93]

Times forward+backward of one packed micro-batch (bf16 autocast over fp32 weights, as `sse-rl sft` and the GRPO
trainer run it) for sequences of `--seq-len` tokens packed to `--tokens`, and for one unpacked sequence of the same
total length, then prints the profiler's top operators by device and by host time.
"""
from __future__ import annotations

import argparse
import time

import torch


def micro_batch(tokens: int, seq_len: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """input_ids [1, tokens] with position_ids restarting every `seq_len` tokens (packed sequences)."""
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    pos = (torch.arange(tokens, device=device) % seq_len)[None]
    return {"input_ids": ids, "position_ids": pos, "labels": ids}


def step_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int) -> float:
    for _ in range(2):  # warm-up: kernel compilation, allocator
        run(model, batch)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run(model, batch)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def run(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sse-h-small")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=93)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from sse_rl.models import SSEHConfig, SSEHForCausalLM

    torch.manual_seed(0)
    config = SSEHConfig.from_preset(args.preset, vocab_size=args.vocab)
    model = SSEHForCausalLM(config).cuda().train()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, {torch.cuda.get_device_name()}", flush=True)
    for name, seq_len in (("packed", args.seq_len), ("one sequence", args.tokens)):
        batch = micro_batch(args.tokens, seq_len, args.vocab, "cuda")
        ms = step_ms(model, batch, args.repeats)
        print(f"{name} ({args.tokens // seq_len} x {seq_len}): {ms:.1f} ms fwd+bwd, "
              f"{args.tokens / ms * 1e3:,.0f} tokens/s, {6 * params * args.tokens / ms / 1e9:.1f} TFLOP/s (6PT)",
              flush=True)

    batch = micro_batch(args.tokens, args.seq_len, args.vocab, "cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(model, batch)
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
