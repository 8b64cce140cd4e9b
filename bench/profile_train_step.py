"""Where the GRPO trainer's time goes on one GPU: the real `TrainerWorker` on the bench's 2B policy.

    python -m bench.profile_train_step --model sse-h-2b --out /tmp/bench [--variants 1@13056 3@8704 0@4352]

Builds (or reuses, same folder) the random policy of `bench_grpo_step.py`, starts one `TrainerWorker` rank with the
settings of `bench/grpo_step_recipe.yaml` (bf16 autocast over fp32 weights, AdamW, the recipe's token budget) and
feeds it random rollouts shaped like the bench's step: `--prompt-len` prompt + `--completion-len` completion tokens
per sequence, non-zero advantages so every token has a gradient. After a warm-up call (kernel compilation, the
allocator), it times `TrainerWorker.train` over `--sequences` rollouts packed into micro-batches and one optimizer
step, and reports seconds per micro-batch, tokens/s, MFU / HFU counted as `bench_grpo_step.py` counts them, and peak
memory. Then it profiles one micro-batch's forward + backward and sums the GPU kernel time by kind (matmul,
attention, SSE kernels, elementwise and copies, other), which is what shows the gap to a matmul-bound step.
`--variants` repeats this in one process for several (recomputed blocks, token budget) pairs: `model.checkpoint_every`
trades memory for less recomputation, and a variant that does not fit reports out-of-memory.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from bench import bench_grpo_step as grpo_step  # the same policy, FLOP count and recipe as the GRPO step bench
from bench.common import MODELS, bench_ms, device_name, kernel_kind, say, write_results


def rollouts(count: int, prompt_len: int, completion_len: int, vocab: int, total_tokens: int) -> list[Any]:
    """Random sequences with the loss weights of token-mean aggregation over `total_tokens` completion tokens."""
    from sse_rl.packing import Sequence

    rng = random.Random(0)
    return [Sequence(prompt_ids=[rng.randrange(vocab) for _ in range(prompt_len)],
                     completion_ids=[rng.randrange(vocab) for _ in range(completion_len)],
                     rollout_logprobs=[-rng.uniform(0.5, 12.0) for _ in range(completion_len)],
                     advantage=rng.gauss(0.0, 1.0), weight=1.0 / total_tokens)
            for _ in range(count)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed_train(worker: Any, micro: list[Any]) -> tuple[float, float, int]:
    """(seconds, peak GiB allocated, allocator retries) of one `train` call on these micro-batches (one mini-batch,
    one update). A retry means the caching allocator ran out, freed its cache and synchronised with the GPU."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = worker.train([micro])  # a StepStats
    torch.cuda.synchronize()
    return time.perf_counter() - t0, stats.gpu_peak_gib, int(stats.gpu_alloc_retries)


def kernel_time_by_kind(worker: Any, mb: Any) -> tuple[dict[str, float], list[list], str]:
    """GPU ms per kernel kind of one micro-batch's forward + backward, the 25 costliest kernels ([name, ms, calls],
    kept in the results so the next optimisation starts from them) and the profiler's top-25 table."""
    from sse_rl.workers.trainer import _Extra

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        worker._micro_step(mb, _Extra(None, None))
        torch.cuda.synchronize()
    worker.optimizer.zero_grad(set_to_none=True)
    table = prof.key_averages()
    kernels = [e for e in table if e.device_type == torch.autograd.DeviceType.CUDA]
    kinds: dict[str, float] = {}
    for event in kernels:
        kind = kernel_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    top_rows = [[e.key[:120], round(e.self_device_time_total / 1e3, 3), e.count] for e in top]
    return kinds, top_rows, table.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)


def attention_check(tokens: int, seqs: int, heads: int, head_dim: int) -> dict[str, float]:
    """ms of forward + backward of one packed causal attention: SDPA with the model's block-diagonal boolean mask
    vs torch's varlen flash attention, `seqs` equal sequences in `tokens` tokens (bf16)."""
    from sse_rl.models.modeling import attention_mask_4d

    cu = torch.arange(0, tokens + 1, tokens // seqs, device="cuda")
    q, k, v = (torch.randn(tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    mask = attention_mask_4d(tokens, tokens, None, cu, torch.device("cuda"))

    def sdpa() -> torch.Tensor:
        qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

    out = {"sdpa_mask_ms": _fwd_bwd_ms(sdpa)}
    try:
        from torch.nn.attention.varlen import varlen_attn

        causal = _causal_kwargs(varlen_attn)
        out["varlen_ms"] = _fwd_bwd_ms(lambda: varlen_attn(q, k, v, cu.int(), cu.int(), tokens, tokens, **causal))
    except (ImportError, RuntimeError, TypeError) as err:
        print(f"varlen_attn unavailable: {type(err).__name__}: {err}", flush=True)
    return out


def _causal_kwargs(fn: Any) -> dict[str, Any]:
    import inspect

    params = inspect.signature(fn).parameters
    print(f"varlen_attn signature: {inspect.signature(fn)}", flush=True)
    return {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}


def _fwd_bwd_ms(fn: Any) -> float:
    """Median ms of `fn`'s forward and a backward from the sum of its output."""
    return bench_ms(lambda: fn().float().sum().backward())


def components(config_dir: Path, tokens: int, seqs: int, compile_too: bool) -> dict[str, dict[str, float]]:
    """ms of forward + backward of each piece of one SSE-H block (the bench policy's shapes, fp32 weights under
    bf16 autocast, `seqs` packed sequences in `tokens` tokens), eager and, with `compile_too`, under
    `torch.compile(dynamic=True)` with the SSE op left out of the graph; plus the compile seconds."""
    from transformers import AutoConfig

    from sse_rl.grpo.logprobs import logprobs_and_entropy
    from sse_rl.models import ops
    from sse_rl.models.modeling import SSEHBlock, attention_mask_4d
    from sse_rl.models.ops.features import SSEFeatures

    config = AutoConfig.from_pretrained(config_dir)
    sse = SSEHBlock(config, next(i for i, t in enumerate(config.layer_types) if t != "full_attention")).cuda()
    attn = SSEHBlock(config, config.attn_layers[0]).cuda()
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False).cuda()
    cu = torch.arange(0, tokens + 1, tokens // seqs, device="cuda")
    pos = (torch.arange(tokens, device="cuda") % (tokens // seqs))[None]
    mask = attention_mask_4d(tokens, tokens, None, cu, torch.device("cuda"))
    x = torch.randn(1, tokens, config.hidden_size, device="cuda", requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (tokens,), device="cuda")
    mixer = sse.attn
    with torch.autocast("cuda", dtype=torch.bfloat16):
        feats = SSEFeatures(*[t.detach().requires_grad_() for t in mixer._features(x)])
        logits = mixer.e_proj(x).detach()

    def out(y: Any) -> torch.Tensor:
        return sum(t.float().sum() for t in (y if isinstance(y, (tuple, list)) else (y,)) if t.requires_grad)

    def logits_loss(h: torch.Tensor) -> torch.Tensor:
        logp, ent = logprobs_and_entropy(head(h[0]), targets)
        return logp.sum() + ent.sum()

    pieces = {
        "rms_norm": lambda: sse.attn_norm(x),
        "sse_features": lambda: mixer._features(x),
        "sse_op": lambda: ops.sse_chunk(features=feats, router_logits=logits, top_k=mixer.top_k, cu_seqlens=cu)[0],
        "sse_mixer": lambda: mixer(x, None, cu)[0],
        "mlp": lambda: sse.mlp(x),
        "sse_block": lambda: sse(x, position_ids=pos, cu_seqlens=cu)[0],
        "attn_block": lambda: attn(x, position_ids=pos, attn_mask=mask, cu_seqlens=cu)[0],
        "logits_loss": lambda: logits_loss(x),
    }
    results: dict[str, dict[str, float]] = {}
    for name, fn in pieces.items():
        def step(f: Any = fn) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return out(f())

        row = {"eager_ms": _fwd_bwd_ms(step)}
        if compile_too and name != "sse_op":
            compiled = torch.compile(step, dynamic=True)
            t0 = time.perf_counter()
            try:
                compiled().backward()
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t0
                row["compiled_ms"] = _fwd_bwd_ms(compiled)
            except Exception as err:  # noqa: BLE001  (a report, not a failure: say what broke)
                print(f"{name}: torch.compile failed: {type(err).__name__}: {str(err)[:300]}", flush=True)
        results[name] = row
        say(f"component {name}: {row}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="sse-h-2b")
    parser.add_argument("--out", type=Path, required=True, help="work folder (the policy is reused from here)")
    parser.add_argument("--sequences", type=int, default=18, help="rollouts per timed train call (18: 6, 9 or 18 "
                        "micro-batches of 3, 2 or 1 sequences)")
    parser.add_argument("--prompt-len", type=int, default=82)
    parser.add_argument("--completion-len", type=int, default=4096)
    parser.add_argument("--variants", nargs="+", default=None, metavar="EVERY@BUDGET",
                        help="gradient checkpointing of every k-th block (0 = none) at a token budget, e.g. 1@13056 "
                             "3@8704 0@4352; default: the recipe's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--components", action="store_true",
                        help="time the pieces of one SSE-H block alone, eager and compiled, and nothing else")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()

    from sse_rl.packing import pack
    from sse_rl.workers.trainer import TrainerWorker, recomputed_blocks

    work = args.out.resolve()
    setup = grpo_step.Setup(args.model, False, work, [])
    setup.overrides = [f"model.path={setup.model_dir}", f"data.train={work / 'prompts.jsonl'}", *args.set]
    recipe = grpo_step.prepare(setup)
    grpo_step.warm_kernels(recipe.model.path)
    config = json.loads((setup.model_dir / "config.json").read_text())
    if args.components:
        per_mb = max(1, recipe.train.token_budget // (args.prompt_len + args.completion_len))
        tokens = per_mb * (args.prompt_len + args.completion_len)
        results = {"device": device_name(), "torch": torch.__version__, "tokens": tokens,
                   "components": components(setup.model_dir, tokens, per_mb, compile_too=True)}
        if args.json:
            write_results(args.json, results)
        return
    counts = grpo_step.param_counts(recipe.model.path)
    t0 = time.perf_counter()
    worker = TrainerWorker(recipe.model.path, rank=0, world_size=1, train=recipe.train, algo=recipe.algo,
                           temperature=recipe.rollout.temperature, seed=0, dtype=recipe.model.dtype,
                           gradient_checkpointing=True)  # the variants then pick the recomputed blocks
    worker.join("127.0.0.1", free_port())
    say(f"trainer up in {time.perf_counter() - t0:.0f}s: {counts['total'] / 1e9:.2f}B parameters, "
        f"{device_name()}, torch {torch.__version__}")

    seqs = rollouts(args.sequences, args.prompt_len, args.completion_len, config["vocab_size"],
                    args.sequences * args.completion_len)
    fwd = grpo_step.forward_flops(config, counts, [args.prompt_len] * args.sequences, 1, args.completion_len)
    results: dict[str, Any] = {"device": device_name(), "torch": torch.__version__,
                               "model": args.model, "params": counts, "sequences": args.sequences,
                               "sequence_tokens": args.prompt_len + args.completion_len, "variants": []}
    layers = worker.model.model.layers
    m = recipe.model
    default = f"{m.checkpoint_every if m.gradient_checkpointing else 0}@{recipe.train.token_budget}"
    for variant in args.variants or [default]:
        every, budget = (int(x) for x in variant.split("@"))
        recomputed = recomputed_blocks(len(layers), every)  # every = 0: no checkpointing
        for block, recompute in zip(layers, recomputed):
            block.gradient_checkpointing = recompute
        (micro,) = pack(seqs, budget)
        tokens = sum(mb.num_tokens for mb in micro)
        row: dict[str, Any] = {"checkpoint_every": every, "token_budget": budget, "micro_batches": len(micro),
                               "tokens": tokens}
        results["variants"].append(row)
        try:
            timed_train(worker, micro[:1])  # warm-up: a recompile for a new size class, the allocator
            seconds, peak, retries = timed_train(worker, micro)
        except torch.OutOfMemoryError as err:
            say(f"{variant}: out of memory ({str(err).splitlines()[0]})")
            row["oom"] = True
            worker.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        peak_flops = grpo_step.H100_BF16_PEAK_TFLOPS * 1e12
        share = sum(recomputed) / len(layers)
        row.update(seconds=seconds, s_per_micro_batch=seconds / len(micro), tokens_per_s=tokens / seconds,
                   mfu=3 * fwd / seconds / peak_flops, hfu=(3 + share) * fwd / seconds / peak_flops, peak_gib=peak,
                   alloc_retries=retries)
        kinds, row["top_kernels"], table = kernel_time_by_kind(worker, micro[0].to(worker.device))
        row["kernel_ms"] = kinds
        say(f"{variant} (checkpoint every {every}, budget {budget}): {seconds:.2f}s for {len(micro)} "
            f"micro-batches ({row['s_per_micro_batch']:.3f} s each), {row['tokens_per_s']:,.0f} tok/s, "
            f"MFU {row['mfu']:.1%}, HFU {row['hfu']:.1%}, peak {peak:.1f} GiB, {retries} allocator retries")
        say(f"{variant}: kernel ms of one micro-batch by kind: "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            + f" (sum {sum(kinds.values()):.1f})")
        print(table, flush=True)
        if args.json:  # after every variant: a run cut off by a time limit keeps what it measured
            write_results(args.json, results)
    if config.get("model_type") == "sse_h":
        per_mb = max(1, recipe.train.token_budget // (args.prompt_len + args.completion_len))
        results["attention_fwd_bwd_ms"] = attention_check(recipe.train.token_budget, per_mb,
                                                          config["attn_num_heads"], config["attn_head_dim"])
        say(f"attention alone, {per_mb} sequences in {recipe.train.token_budget} tokens: "
            f"{results['attention_fwd_bwd_ms']}")
    if args.json:
        write_results(args.json, results)
    worker.close()


if __name__ == "__main__":
    main()
