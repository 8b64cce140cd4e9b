"""One GRPO step of the real pipeline on one GPU, split into rollout / reward / train / sync: SSE-H-2B against a
Qwen3-1.7B-shaped Transformer, both with random weights (issue 8, "step-time breakdown at 2B scale").

Run on one GPU, from the repo root, one model and part per call (each fits a 10-minute call):
    python -m bench.bench_grpo_step --model sse-h-2b --part plain --out /tmp/bench --results $OUT/grpo_step.json
    python -m bench.bench_grpo_step --model sse-h-2b --part pipeline --out /tmp/bench --results $OUT/grpo_step.json
    python -m bench.bench_grpo_step --model sse-h-2b --part sampling --out /tmp/bench --results $OUT/grpo_step.json
then here: --merge FILE... (into bench/results/grpo_step.json) and --report (writes bench/results/grpo_step.md).
`--tiny` runs the same code on CPU with tiny shapes (plumbing only: its numbers are not results).

Choices:
- Everything is built locally and deterministically (no hub): a byte-level BPE tokenizer of exactly the models'
  vocabulary (256 bytes + generated merges + the chat special tokens, EOS <|im_end|>), so every id a random model
  samples decodes; the policy from its config with seeded random weights, saved in the engine dtype; 32 short
  arithmetic prompts as .jsonl. A random model almost never samples EOS, so responses run to max_tokens.
- `pipeline` is `sse-rl train` itself (`sse_rl.train.main`) on bench/grpo_step_recipe.yaml plus overrides; the
  numbers are the last step's row of its metrics.jsonl (time/rollout, time/reward, time/train, time/sync, ...).
  The row is recorded as soon as it is written: the pipeline still saves a checkpoint after its last step.
  Before it starts, the SSE kernels of the policy's shapes are compiled once (`warm_kernels`, Triton's disk cache),
  so the one timed step does not include the trainer's first-call compilation; that and building the policy run in
  child processes, so the driver holds no GPU memory during the step.
- `plain` is vLLM alone on the same batch: the same encoded prompts, n = G, max_tokens, temperature, top_p, and
  the engine settings of the resolved recipe (dtype, gpu_memory_utilization, max_model_len, enforce_eager, sleep
  mode); text, no logprobs and no seeds (the rollout worker asks for flat logprobs and token ids only, and reseeds
  the engine for each call). One short warm-up generate first (a plain request and one of the worker's).
- `sampling` times the same batch on one engine three times: plain, as the rollout worker asks, and that with a
  seed per request (~8 minutes for SSE-H-2B on an H100).
- Training FLOPs per step = 3 x forward FLOPs (MFU, model FLOPs); with gradient checkpointing the hardware does
  (3 + f) x forward, f = the share of blocks recomputed (HFU, recomputation counted). Forward FLOPs
  (see `forward_flops`):
    dense:   2 * P_body * T_all + 2 * P_lm_head * T_completion      (embedding lookups cost none; logits are only
                                                                    computed at completion positions)
    softmax attention, per layer and sequence of length L (causal):  2 * L^2 * heads * head_dim
    SSE (chunked GLA over the shared stream and K routed streams), per layer and token:
             (1 + K) * heads * (4 * dk * dv + C * (dk + dv)),  C = 64 (chunk size)
- Progress lines carry a timestamp, and a heartbeat prints every 30 s, so a call cut off by its time limit shows
  where it was.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import MODELS, device_name, model_config, say, write_results

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "bench" / "grpo_step_recipe.yaml"  # bench-only: model and data are set by this script
RESULTS = REPO / "bench" / "results" / "grpo_step.json"
TINY_SHAPES = {"sse-h-2b": "sse-h-tiny", "qwen3-1.7b-shape": "qwen3-tiny-shape"}  # --tiny: the CPU stand-ins
PARTS = ("plain", "pipeline", "sampling")
H100_BF16_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
SSE_CHUNK = 64
TINY_OVERRIDES = [  # CPU: tiny shapes, G=2, 4 prompts, 16 tokens, fp32, object-store sync, no sleep mode
    "rollout.group_size=2", "rollout.max_tokens=16", "rollout.max_model_len=272", "rollout.dtype=float32",
    "rollout.num_gpus_per_engine=0", "rollout.sleep_level=0", "rollout.weight_sync=object_store",
    "rollout.enforce_eager=true", "model.dtype=float32", "train.num_gpus_per_trainer=0", "train.prompts_per_step=4",
    "train.token_budget=1024", "train.steps=2", "reward.num_workers=1", "run.ray_num_cpus=4",
    "run.probe_tolerance=1e-3",
]


@dataclass
class Setup:
    """What one invocation works on: the model, its folders and the resolved recipe."""

    model: str
    tiny: bool
    work: Path  # --out: tokenizer, model, prompts, run directory
    overrides: list[str]  # recipe overrides (paths, --tiny, --set)

    @property
    def model_dir(self) -> Path:
        return self.work / self.model_name

    @property
    def model_name(self) -> str:
        return f"{self.model}{'-tiny' if self.tiny else ''}"

    @property
    def run_dir(self) -> Path:
        return self.work / f"run-{self.model_name}"

    def recipe(self) -> Any:
        from sse_rl.config import load_recipe

        return load_recipe(RECIPE, self.overrides)


# ---------------------------------------------------------------------------------------------------------------
# Local artefacts: tokenizer, prompts, random policy.


def build_tokenizer(out_dir: Path, vocab_size: int) -> Any:
    """A byte-level BPE of exactly `vocab_size` ids: 256 byte symbols, merges of byte pairs then of (pair, byte)
    in a fixed order until full, and the chat special tokens last (EOS <|im_end|>). Every id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sse_rl.tokenizer import CHAT_TEMPLATE, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

    target = vocab_size - len(SPECIAL_TOKENS)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if target < len(alphabet):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for lefts in (alphabet, [a + b for a in alphabet for b in alphabet]):
        for left in lefts:
            for right in alphabet:
                if len(vocab) == target:
                    break
                if left + right not in vocab:
                    vocab[left + right] = len(vocab)
                    merges.append((left, right))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        additional_special_tokens=SPECIAL_TOKENS[1:],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"built a tokenizer of {len(tokenizer)} ids, wanted {vocab_size}")
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def write_prompts(path: Path, count: int) -> None:
    """`count` short arithmetic word problems with integer answers (columns problem, answer)."""
    rows = []
    for i in range(count):
        a, b, c = 7 + 13 * i, 3 + 5 * (i % 7), 2 + i % 5
        rows.append({"problem": f"A shelf holds {a} books. Someone adds {b} more, then the books are split "
                                f"evenly into {c} boxes with the remainder left out. How many books are in "
                                f"each box?", "answer": str((a + b) // c)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def policy_config(name: str, tiny: bool, tokenizer: Any) -> Any:
    """The policy's config: the model's shape (its CPU stand-in with --tiny) with the tokenizer's ids, lm_head untied
    for both models (Qwen3-1.7B ties it; untied, as in bench/results/grpo_step*.json: the recipe's fsdp2 strategy
    cannot shard a tied head over several trainer ranks)."""
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    return model_config(TINY_SHAPES[name] if tiny else name, **ids, tie_word_embeddings=False)


def in_child(fn: Any, *args: Any) -> None:
    """Run `fn(*args)` in a fresh (spawned) process, so that the driver's own GPU work (the random policy, the kernel
    warm-up) leaves no CUDA context behind in it: ~0.8 GiB on the H100 that the GRPO step's trainer would otherwise
    miss, and that `sse-rl train`'s driver does not hold."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=fn, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed in its child process (exit code {proc.exitcode})")


def build_model(setup: Setup, dtype: str) -> None:
    """Tokenizer + seeded random weights, saved in the engine dtype, unless already there. Initialised on the GPU
    where there is one (2B parameters: seconds there, two minutes on 16 CPU cores), in a child process."""
    if (setup.model_dir / "config.json").is_file():
        say(f"reusing {setup.model_dir}")
    else:
        in_child(save_random_policy, setup, dtype)


def save_random_policy(setup: Setup, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    tmp = setup.model_dir.with_name(setup.model_dir.name + ".tmp")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(tmp, 384 if setup.tiny else 151936)
    say(f"tokenizer: {len(tokenizer)} ids in {time.perf_counter() - t0:.1f}s")
    config = policy_config(setup.model, setup.tiny, tokenizer)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(tmp))
    os.replace(tmp, setup.model_dir)
    count = sum(p.numel() for p in model.parameters())
    say(f"model: {setup.model_name}, {count:,} parameters, saved to {setup.model_dir}")


def encoded_prompts(setup: Setup, recipe: Any) -> list[Any]:
    """The training prompts exactly as `sse-rl train` encodes them (template, chat template, token ids)."""
    from transformers import AutoTokenizer

    from sse_rl.data import encode_prompts, load_prompts

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    d = recipe.data
    prompts = load_prompts(d.train, split=d.train_split, subset=d.subset, template=d.prompt_template,
                           answer_column=d.answer_column, tokenizer=tokenizer, chat_template=d.chat_template)
    return encode_prompts(prompts, tokenizer, recipe.rollout.max_model_len - recipe.rollout.max_tokens, d.train)


def prepare(setup: Setup) -> Any:
    """Tokenizer, policy and prompts on disk; returns the resolved recipe."""
    setup.work.mkdir(parents=True, exist_ok=True)
    prompts = setup.work / "prompts.jsonl"
    write_prompts(prompts, 4 if setup.tiny else 32)
    recipe = setup.recipe()
    build_model(setup, recipe.rollout.dtype)
    return recipe


# ---------------------------------------------------------------------------------------------------------------
# The two parts.


def start_engine(setup: Setup, recipe: Any, part: str) -> tuple[Any, list[Any], float]:
    """(engine, the step's prompts, start seconds): `vllm.LLM` from the `EngineSpec` of the resolved recipe's engine
    settings (as `sse_rl.actors` starts the rollout engines) with the rollout worker's logprobs mode, after one short
    warm-up generate."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from sse_rl.actors import engine_spec
    from sse_rl.config import SamplingConfig
    from sse_rl.workers.rollout import request_params

    r = recipe.rollout
    prompts = [TokensPrompt(prompt_token_ids=p.ids) for p in encoded_prompts(setup, recipe)]
    prompts = prompts[:recipe.train.prompts_per_step]
    say(f"{part}: starting vLLM")
    t0 = time.perf_counter()
    spec = engine_spec(recipe, recipe.model.path)  # as `sse-rl train` builds its rollout engines
    llm = spec.build(logprobs_mode="processed_logprobs", enable_sleep_mode=r.sleep_level > 0)
    start_s = time.perf_counter() - t0
    # warm-up: one plain request and one as the rollout worker asks (its logprobs path has first-use costs too)
    warm = SamplingConfig(n=2, max_tokens=16, temperature=r.temperature)
    llm.generate(prompts[:2], [SamplingParams(n=2, max_tokens=16), request_params(warm)], use_tqdm=False)
    say(f"{part}: engine up in {start_s:.0f}s; {len(prompts)} prompts x {r.group_size}, up to {r.max_tokens} tokens")
    return llm, prompts, start_s


def timed_generate(llm: Any, prompts: list[Any], recipe: Any, label: str, *, worker: bool,
                   request_seeds: list[int] | None = None) -> dict[str, Any]:
    """Completion tokens / seconds of one generate call over the batch. `worker`: the rollout worker's requests
    (sampled-token logprobs, flat, token ids only; the engine reseeded for the call), else plain text requests;
    `request_seeds`: a seed per request besides."""
    from vllm import SamplingParams

    from sse_rl.config import SamplingConfig
    from sse_rl.eval.engines import reseed_sampler
    from sse_rl.workers.rollout import request_params

    r = recipe.rollout
    if worker:
        params = request_params(SamplingConfig(n=r.group_size, max_tokens=r.max_tokens, temperature=r.temperature,
                                               top_p=r.top_p))
        llm.collective_rpc(reseed_sampler, args=(recipe.seed,))  # as RolloutWorker.generate before a seeded call
    else:
        params = SamplingParams(n=r.group_size, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p)
    params = [params] * len(prompts)
    for i, seed in enumerate(request_seeds or []):
        params[i] = params[i].clone()
        params[i].seed = seed
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    lengths = [len(c.token_ids) for o in outputs for c in o.outputs]
    say(f"{label}: {sum(lengths)} tokens in {seconds:.1f}s = {sum(lengths) / seconds:,.0f} tok/s")
    return {"seconds": seconds, "completion_tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
            "sequences": len(lengths), "truncated_frac": sum(n == r.max_tokens for n in lengths) / len(lengths)}


def run_plain(setup: Setup, recipe: Any) -> dict[str, Any]:
    """vLLM alone on the step's batch (see module doc): text, no logprobs, no seeds."""
    llm, prompts, start_s = start_engine(setup, recipe, "plain")
    return {**timed_generate(llm, prompts, recipe, "plain", worker=False), "engine_start_s": start_s}


def run_sampling(setup: Setup, recipe: Any) -> dict[str, Any]:
    """What the rollout worker's requests cost beside plain generation, on one engine: the batch as plain requests,
    as the worker asks (logprobs, flat, token ids only, one seed for the call), and the same with a seed per
    request (what the worker asked before: vLLM then draws each seeded request's noise separately)."""
    llm, prompts, start_s = start_engine(setup, recipe, "sampling")
    seeds = [recipe.seed + i * recipe.rollout.group_size for i in range(len(prompts))]  # n children: seed + k
    return {"plain": timed_generate(llm, prompts, recipe, "sampling, plain", worker=False),
            "worker": timed_generate(llm, prompts, recipe, "sampling, worker", worker=True),
            "worker_request_seeds": timed_generate(llm, prompts, recipe, "sampling, worker + request seeds",
                                                   worker=True, request_seeds=seeds),
            "engine_start_s": start_s}


def watch_metrics(run_dir: Path, last_step: int, on_last: Any, stop: threading.Event) -> None:
    """Heartbeat (every 30 s) and step rows as they land; `on_last(row)` as soon as the last step's row exists."""
    from sse_rl.metrics_log import read_metrics

    seen, beat = 0, time.perf_counter()
    while not stop.wait(2.0):
        rows = read_metrics(run_dir)
        for row in rows[seen:]:
            times = {k.split("/")[1]: round(v, 2) for k, v in row.items() if k.startswith("time/")}
            say(f"pipeline: step {row['step']} logged: {times}")
            if row["step"] == last_step:
                on_last(row)
        seen = len(rows)
        if time.perf_counter() - beat >= 30:
            beat = time.perf_counter()
            say(f"pipeline: running, {seen} metric rows, GPU memory used {gpu_memory_used()}")


def gpu_memory_used() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a (no nvidia-smi)"


def warm_kernels(model_path: str) -> None:
    """Compile the SSE Triton kernels of this policy's shapes once, before the run: Triton keeps them in its disk
    cache, so the trainer's first (the timed) step loads them instead of compiling (~10 s on the H100). A two-layer
    copy of the config (same heads and head dims) on the GPU, one packed forward + backward under bf16 autocast."""
    import torch
    from transformers import AutoConfig

    from sse_rl.models import SSEHForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    if config.model_type != "sse_h" or not torch.cuda.is_available():
        return
    t0 = time.perf_counter()
    fields = {**config.to_dict(), "num_hidden_layers": 2, "attn_layers": [1], "vocab_size": 1024}
    small = type(config).from_dict({k: v for k, v in fields.items() if k != "layer_types"})
    model = SSEHForCausalLM(small).cuda().train()
    ids = torch.randint(0, 1024, (1, 300), device="cuda")
    pos = torch.cat([torch.arange(100), torch.arange(200)])[None].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, position_ids=pos, cu_seqlens=torch.tensor([0, 100, 300], device="cuda"))
    out.logits.float().mean().backward()
    del model, out
    torch.cuda.empty_cache()
    say(f"SSE kernels compiled for the trainer's shapes in {time.perf_counter() - t0:.1f}s")


def run_pipeline(setup: Setup, recipe: Any, record: Any) -> None:
    """`sse-rl train` on the bench recipe; `record(result)` gets the last step's numbers when its row lands."""
    import shutil

    from sse_rl import train

    shutil.rmtree(setup.run_dir, ignore_errors=True)  # a fresh run: no resume from an earlier attempt
    prompts = encoded_prompts(setup, recipe)
    counts = param_counts(recipe.model.path)
    in_child(warm_kernels, recipe.model.path)
    done = threading.Event()

    def on_last(row: dict[str, float]) -> None:
        record(pipeline_result(row, recipe, prompts, counts))
        done.set()

    stop = threading.Event()
    watcher = threading.Thread(target=watch_metrics, args=(setup.run_dir, recipe.train.steps, on_last, stop),
                               daemon=True)
    watcher.start()
    say(f"pipeline: sse_rl.train.main, {recipe.train.steps} step(s)")
    try:
        train.main([str(RECIPE), *setup.overrides])
    finally:
        time.sleep(2.5)  # the watcher's last poll
        stop.set()
        watcher.join()
    if not done.is_set():
        raise RuntimeError(f"{setup.run_dir}/metrics.jsonl has no row for step {recipe.train.steps}")


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and the pipeline's numbers.


def param_counts(model_path: str) -> dict[str, int]:
    """Parameters of the embedding, the lm_head and the rest (the body), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    return {"total": total, "embedding": embed, "lm_head": head, "body": total - embed - head}


def mixing_flops(config: dict[str, Any], length: int) -> float:
    """Forward FLOPs of the token mixing (not in the parameter count) for one sequence of `length` tokens."""
    if config["model_type"] == "sse_h":
        attn = len(config["attn_layers"])
        dk, dv = config["head_dim"], int(config["head_dim"] * config["expand_v"])
        per_token = (1 + config["num_writer"]) * config["num_heads"] * (4 * dk * dv + SSE_CHUNK * (dk + dv))
        sse = (config["num_hidden_layers"] - attn) * per_token * length
        return sse + attn * 2.0 * length**2 * config["attn_num_heads"] * config["attn_head_dim"]
    return config["num_hidden_layers"] * 2.0 * length**2 * config["num_attention_heads"] * config["head_dim"]


def forward_flops(config: dict[str, Any], counts: dict[str, int], prompt_lens: list[int], group: int,
                  completion_len: float) -> float:
    """Forward FLOPs of one training batch: G completions of `completion_len` tokens per prompt."""
    lengths = [p + completion_len for p in prompt_lens for _ in range(group)]
    dense = 2.0 * counts["body"] * sum(lengths) + 2.0 * counts["lm_head"] * completion_len * len(lengths)
    return dense + sum(mixing_flops(config, round(n)) for n in lengths)


def recomputed_share(gradient_checkpointing: bool, checkpoint_every: int, num_layers: int) -> float:
    """Share of the decoder blocks that gradient checkpointing runs forward twice (the trainer's own choice)."""
    from sse_rl.workers.trainer import recomputed_blocks

    return sum(recomputed_blocks(num_layers, checkpoint_every if gradient_checkpointing else 0)) / num_layers


def pipeline_result(row: dict[str, float], recipe: Any, prompts: list[Any], counts: dict[str, int]) -> dict:
    """The reported numbers of one step's metrics row (FLOPs from the step's prompts and mean response length;
    exact when every response has the same length, e.g. all truncated)."""
    config = json.loads((Path(recipe.model.path) / "config.json").read_text())
    drawn = prompts[:recipe.train.prompts_per_step]
    completion = row["response_length/mean"]
    fwd = forward_flops(config, counts, [len(p.ids) for p in drawn], recipe.rollout.group_size, completion)
    recompute = recomputed_share(recipe.model.gradient_checkpointing, recipe.model.checkpoint_every,
                                 config["num_hidden_layers"])
    tokens = sum(len(p.ids) + completion for p in drawn) * recipe.rollout.group_size
    trained = row["throughput/train_tokens_per_s"] * row["time/train"]
    if abs(tokens - trained) > 0.01 * trained:
        say(f"warning: the FLOPs count {tokens:.0f} tokens, the trainer reports {trained:.0f}")
    keys = ("time/step", "time/rollout", "time/reward", "time/train", "time/train_pack", "time/train_prepare",
            "time/train_updates", "time/train_release", "time/sync", "time/engine_sleep", "time/engine_wake",
            "throughput/rollout_tokens_per_s", "throughput/train_tokens_per_s",
            "response_length/mean", "response_length/truncated_frac", "probe/max_abs_diff", "train/grad_norm",
            "train/graphs_compiled", "train/gpu_peak_gib", "train/gpu_alloc_retries", "sampling/kept_groups")
    return {"step": row["step"], **{k: row[k] for k in keys if k in row},
            "train_tokens": trained, "flops_tokens": tokens,
            "completion_tokens": completion * len(drawn) * recipe.rollout.group_size,
            "params": counts, "model_flops": 3 * fwd, "hardware_flops": (3 + recompute) * fwd,
            "flops_exact": row["response_length/truncated_frac"] == 1.0}


# ---------------------------------------------------------------------------------------------------------------
# Results file and report.


def environment(recipe: Any, tiny: bool) -> dict[str, Any]:
    import torch
    import transformers
    import vllm

    r = recipe.rollout
    return {"device": device_name(), "tiny": tiny,
            "torch": torch.__version__, "vllm": vllm.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "setting": {"prompts": recipe.train.prompts_per_step, "group_size": r.group_size,
                        "max_tokens": r.max_tokens, "max_model_len": r.max_model_len, "dtype": r.dtype,
                        "gpu_memory_utilization": r.gpu_memory_utilization, "enforce_eager": r.enforce_eager,
                        "sleep_level": r.sleep_level, "weight_sync": r.weight_sync,
                        "token_budget": recipe.train.token_budget, "trainer_dtype": recipe.model.dtype,
                        "steps": recipe.train.steps, "compile": recipe.train.compile,
                        "gradient_checkpointing": recipe.model.gradient_checkpointing,
                        "checkpoint_every": recipe.model.checkpoint_every}}


def merge_into(path: Path, model: str, part: str, result: dict[str, Any]) -> None:
    """results[model][part] = result, keeping every other entry of the file."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault(model, {})[part] = result
    write_results(path, data)
    say(f"results: {model}/{part} written to {path}")


PHASES = ("step", "rollout", "reward", "train", "sync")
EVEN_S = 0.5  # phases closer than this are reported as even, not as a win or a loss


def derived(model: dict[str, Any], peak_tflops: float) -> dict[str, float | None]:
    """The table's numbers of one model (None where a part is missing)."""
    plain, pipe = model.get("plain"), model.get("pipeline")
    out: dict[str, float | None] = {f"{p}_s": pipe.get(f"time/{p}") if pipe else None for p in PHASES}
    out["rollout_tok_s"] = pipe["throughput/rollout_tokens_per_s"] if pipe else None
    out["plain_tok_s"] = plain["tokens_per_s"] if plain else None
    out["rollout_frac"] = out["rollout_tok_s"] / out["plain_tok_s"] if pipe and plain else None
    out["train_tok_s"] = pipe["throughput/train_tokens_per_s"] if pipe else None
    peak = peak_tflops * 1e12
    out["mfu"] = pipe["model_flops"] / pipe["time/train"] / peak if pipe else None
    out["hfu"] = pipe["hardware_flops"] / pipe["time/train"] / peak if pipe else None
    out["sleep_wake_s"] = (pipe.get("time/engine_sleep", 0.0) + pipe.get("time/engine_wake", 0.0)) if pipe else None
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _checkpointing(setting: dict[str, Any]) -> str:
    """'on', 'off' or 'on for blocks 0, k, 2k, ...' (older results files have no checkpoint_every)."""
    if not setting["gradient_checkpointing"]:
        return "off"
    every = setting.get("checkpoint_every", 1)
    return "on" if every == 1 else f"on for blocks 0, {every}, {2 * every}, ..."


def _table(data: dict[str, Any], nums: dict[str, dict], peak_tflops: float) -> list[str]:
    lines = ["| model | params | step s | rollout s | reward s | train s | sync s | sleep+wake s | rollout tok/s | "
             "plain vLLM tok/s | rollout / plain | train tok/s | MFU | HFU |", "|---" * 14 + "|"]
    for name, n in nums.items():
        pipe = data[name].get("pipeline", {})
        params = pipe.get("params", {}).get("total")
        size = "—" if params is None else f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
        lines.append(f"| {name} | {size} | " + " | ".join(
            _fmt(n[f"{p}_s"], ".1f") for p in PHASES) + f" | {_fmt(n['sleep_wake_s'], '.1f')} | "
            f"{_fmt(n['rollout_tok_s'], ',.0f')} | {_fmt(n['plain_tok_s'], ',.0f')} | {_fmt(n['rollout_frac'], '.1%')} "
            f"| {_fmt(n['train_tok_s'], ',.0f')} | {_fmt(n['mfu'], '.1%')} | {_fmt(n['hfu'], '.1%')} |")
    lines += ["", f"Targets: rollout / plain >= 90 %, MFU >= 30 % (peak {peak_tflops:.0f} TFLOP/s dense bf16), "
              "weight sync < 2 s."]
    for name, n in nums.items():
        checks = [("rollout / plain >= 90 %", n["rollout_frac"], 0.9, True), ("MFU >= 30 %", n["mfu"], 0.3, True),
                  ("sync < 2 s", n["sync_s"], 2.0, False)]
        verdicts = [f"{label}: {'—' if v is None else ('met' if (v >= bar if high else v < bar) else 'NOT met')}"
                    for label, v, bar, high in checks]
        lines.append(f"- {name}: " + "; ".join(verdicts))
    return lines


def _comparison(sse: dict[str, float | None], qwen: dict[str, float | None]) -> list[str]:
    """SSE-H / Qwen ratios per phase and the generated wins/losses."""
    lines = ["## SSE-H-2B / Qwen3-1.7B-shape", "", "| phase | SSE-H s | Qwen s | ratio (time) |", "|---|---|---|---|"]
    wins, losses, even = [], [], []
    for p in PHASES:
        a, b = sse[f"{p}_s"], qwen[f"{p}_s"]
        if a is None or b is None:
            continue
        lines.append(f"| {p} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
        if p == "step":
            continue
        text = f"{p}: {a:.1f} s vs {b:.1f} s ({max(a, b) / max(min(a, b), 1e-9):.2f}x, {abs(a - b):.1f} s per step)"
        (even if abs(a - b) < EVEN_S else wins if a < b else losses).append(text if abs(a - b) >= EVEN_S else p)
    for key, label, spec in (("rollout_tok_s", "rollout tok/s", ",.0f"), ("plain_tok_s", "plain vLLM tok/s", ",.0f"),
                             ("train_tok_s", "train tok/s", ",.0f"), ("mfu", "MFU", ".1%")):
        if sse[key] is not None and qwen[key] is not None:
            lines.append(f"| {label} | {sse[key]:{spec}} | {qwen[key]:{spec}} | {sse[key] / qwen[key]:.2f} "
                         "(SSE-H / Qwen) |")
    lines += ["", "Where SSE-H wins: " + ("; ".join(wins) or "nowhere") + ".",
              "Where SSE-H loses: " + ("; ".join(losses) or "nowhere") + "."]
    if even:
        lines.append(f"Even (within {EVEN_S} s per step): {', '.join(even)}.")
    if sse["step_s"] and qwen["step_s"]:
        lines.append(f"Whole step: SSE-H takes {sse['step_s'] / qwen['step_s']:.2f}x Qwen's time "
                     f"({sse['step_s']:.1f} s vs {qwen['step_s']:.1f} s).")
    return lines


SAMPLING = (("worker", "the rollout worker's requests: logprobs (flat), token ids only, one seed per call"),
            ("worker_request_seeds", "the same + a seed per request"))


def _sampling(data: dict[str, Any]) -> list[str]:
    """The rollout worker's request variants against plain generation, for each model with a sampling part."""
    lines = []
    for name in MODELS:
        parts = data.get(name, {})
        plain, sampling, pipe = parts.get("plain"), parts.get("sampling"), parts.get("pipeline")
        if not (plain and sampling):
            continue
        # variants measured beside an older plain run (older code or machine) are compared with that run
        base = sampling.get("plain", plain)
        rows = [(f"plain: text, no logprobs, no seeds ({base.get('date', sampling['date'])})", base)] + [
            (label, sampling[k]) for k, label in SAMPLING if k in sampling]
        lines += [f"## What the rollout's requests cost ({name}, the same batch, vLLM alone)", "",
                  "| request | s | tok/s | of plain |", "|---|---|---|---|"]
        lines += [f"| {label} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['tokens_per_s'] / base['tokens_per_s']:.1%} |" for label, r in rows]
        if pipe and base is not plain:
            lines.append(f"| plain, measured with the pipeline row ({plain['date']}) | {plain['seconds']:.1f} | "
                         f"{plain['tokens_per_s']:,.0f} | 100.0% |")
        if pipe:
            tok_s = pipe["throughput/rollout_tokens_per_s"]
            lines.append(f"| the pipeline's rollout phase (table above) | {pipe['time/rollout']:.1f} | {tok_s:,.0f} | "
                         f"{tok_s / plain['tokens_per_s']:.1%} |")
        lines.append("")
    return lines


def write_report(path: Path, peak_tflops: float) -> None:
    """bench/results/grpo_step.md from the results json: environment, table, ratios, wins and losses."""
    data = json.loads(path.read_text())
    nums = {name: derived(data[name], peak_tflops) for name in MODELS if name in data}
    metas = [part for name in nums for part in data[name].values()]
    meta = metas[0]
    devices = sorted({m["device"] for m in metas})
    s = meta["setting"]
    lines = [f"# One GRPO step, engine and trainer on one GPU ({', '.join(devices)})", "",
             f"torch {meta['torch']}, vLLM {meta['vllm']}, transformers {meta['transformers']}; "
             f"{s['prompts']} prompts x G={s['group_size']}, responses up to {s['max_tokens']} tokens "
             f"(max_model_len {s['max_model_len']}), engine {s['dtype']} at gpu_memory_utilization "
             f"{s['gpu_memory_utilization']}, {'eager' if s['enforce_eager'] else 'CUDA graphs'}, sleep level "
             f"{s['sleep_level']}, weight sync {s['weight_sync']}; trainer {s['trainer_dtype']}, gradient "
             f"checkpointing "
             f"{_checkpointing(s)}, torch.compile {'on' if s.get('compile') else 'off'}, "
             f"token budget {s['token_budget']}; random weights, "
             f"dynamic sampling off. Reported step: the last of {s['steps']}"
             f"{' (so it includes first-step warm-up)' if s['steps'] == 1 else ''}."]
    if any(m.get("tiny") for m in metas):
        lines += ["", "**Tiny CPU plumbing check: these numbers are not results.**"]
    lines += ["", *_table(data, nums, peak_tflops), ""]
    if len(nums) == 2:
        lines += [*_comparison(nums[MODELS[0]], nums[MODELS[1]]), ""]
    lines += _sampling(data)
    if data.get("notes"):
        lines += ["## Notes on these runs", "", *[f"- {note}" for note in data["notes"]], ""]
    lines += ["## How the numbers are made", "",
              "- Phases are the pipeline's own `time/*` metrics of the step (metrics.jsonl); sleep+wake is vLLM "
              "sleep mode around the train phase (in the step, not in train or sync).",
              "- rollout tok/s = completion tokens / time/rollout; plain vLLM = the same prompts, n, max_tokens, "
              "temperature and engine settings with `vllm.LLM` alone (no logprobs, no seeds).",
              "- MFU = 3 x forward FLOPs / time/train / peak; HFU counts the recomputation of gradient checkpointing "
              "((3 + f) x forward, f = share of the blocks recomputed). Forward FLOPs = 2 P_body T_all + "
              "2 P_lm_head T_completion + mixing; mixing = "
              "2 L^2 heads head_dim per softmax-attention layer and sequence, (1 + K) heads (4 dk dv + 64 (dk + dv)) "
              "per SSE layer and token. time/train includes packing and the optimizer step.",
              "- The pipeline writes one checkpoint after the last step (run.save_every=0 does not disable it); "
              "it comes after the step's metrics and is not timed."]
    out = path.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = parse_args()
    if args.merge:
        for file in args.merge:
            for model, parts in json.loads(Path(file).read_text()).items():
                for part, result in parts.items() if model in MODELS else ():
                    merge_into(args.results, model, part, result)
        return
    if args.report:
        write_report(args.results, args.peak_tflops)
        return
    for part in PARTS if args.part == "all" else (args.part,):
        if args.part == "all":  # each part in its own process: an in-process vLLM engine never fully frees its GPU
            subprocess.run([sys.executable, "-m", __spec__.name, *sys.argv[1:], "--part", part], check=True)
        else:
            run_part(args, part)


def run_part(args: argparse.Namespace, part: str) -> None:
    work = args.out.resolve()
    setup = Setup(args.model, args.tiny, work, [])
    setup.overrides = [f"model.path={setup.model_dir}", f"data.train={work / 'prompts.jsonl'}",
                       f"out_dir={setup.run_dir}", *(TINY_OVERRIDES if args.tiny else []), *args.set]
    say(f"{args.model} / {part}{' (tiny, CPU)' if args.tiny else ''}: work dir {work}")
    recipe = prepare(setup)
    meta = environment(recipe, args.tiny)

    def record(result: dict[str, Any]) -> None:
        merge_into(args.results, args.model, part, {**meta, **result})

    if part in ("plain", "sampling"):
        record((run_plain if part == "plain" else run_sampling)(setup, recipe))
    else:
        run_pipeline(setup, recipe, record)
    say(f"{args.model} / {part}: done")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, help="the policy to time")
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all",
                        help="plain vLLM generation of the batch, the pipeline step, plain generation with the "
                             "rollout worker's requests, or all three (one process each)")
    parser.add_argument("--out", type=Path, help="work folder: tokenizer, random model, prompts, run directory")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (plumbing check, not results)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for both parts, e.g. --set train.token_budget=13056")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"results json to merge into (default {RESULTS.relative_to(REPO)}; with --tiny: "
                             "OUT/grpo_step.json)")
    parser.add_argument("--merge", nargs="+", type=Path, help="merge these results files into --results, run nothing")
    parser.add_argument("--report", action="store_true", help="write the .md next to --results from it, run nothing")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS,
                        help="the device's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    args = parser.parse_args()
    if not (args.merge or args.report) and (args.model is None or args.out is None):
        parser.error("--model and --out are required to run a part")
    if args.results is None:
        args.results = args.out / "grpo_step.json" if args.tiny else RESULTS
    return args


if __name__ == "__main__":
    main()
