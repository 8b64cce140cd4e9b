"""The single controller: starts the Ray actors, then runs the GRPO step loop and nothing else.

One step: prompts = sampler.take -> engines.generate (G each) -> reward pool.score -> drop zero-variance groups and
refill (dynamic sampling) -> advantages -> pack by token budget -> trainers.train -> weight sync + probe -> log,
checkpoint, eval. The controller holds token ids, rewards and metrics, never model tensors: weights move from the
trainers to the engines through the object store.

Two evals: `evaluate` (mean reward on the held-out prompts of data.eval, eval/*) and `validate` (the eval package on
the eval.benchmark problems: avg@n, pass@k, maj@k as val/*, report files in OUT_DIR/val/step_NNNN). Both sample with
the run's engines and grade with the run's reward pool, so they cost no extra processes.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from sse_rl import checkpoint, weight_sync
from sse_rl.config import Recipe, resolve_sync_method
from sse_rl.data import EpochSampler, Prompt
from sse_rl.eval import Generation, GenRequest, Grade, Problem, SamplingConfig, extract_answer
from sse_rl.eval import evaluate as evaluate_benchmark
from sse_rl.grpo.advantages import build_advantage_fn
from sse_rl.grpo.filters import group_has_variance, loss_keep_mask
from sse_rl.grpo.losses import build_loss_agg
from sse_rl.metrics_log import MetricsLog
from sse_rl.packing import MicroBatch, Sequence, pack
from sse_rl.placement import packed_group
from sse_rl.workers.reward import RewardWorker
from sse_rl.workers.rollout import Rollout, RolloutWorker, SamplingSpec
from sse_rl.workers.trainer import TrainerWorker


@dataclass
class Group:
    """One prompt with its G scored completions."""

    prompt: Prompt
    rollouts: list[Rollout]
    rewards: list[float]  # weighted total per completion (None from the pool counts as 0)
    accuracy: list[float]  # raw value of the accuracy function per completion
    per_function: dict[str, list[float]]  # every reward function's raw value per completion


@dataclass
class ValSet:
    """The validation benchmark of a run (eval.benchmark), resolved at start-up by `sse_rl.train.load_val_set`."""

    name: str  # benchmark name in the eval package's reports (the file stem for a local file)
    problems: list[Problem]  # problem text already rendered with data.prompt_template
    tokenizer: Any  # renders (data.chat_template) and tokenizes the prompts
    sampling: SamplingConfig


def call_seed(seed: int, *parts: int) -> int:
    """The sampling seed of one rollout call from the run seed and the call's coordinates (step, round; -1 for the
    held-out eval), hashed so that no two calls of a run share a random stream. Below 2**62, so that engine i's
    seed + i stays in the range of `torch.manual_seed`."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**62


class Controller:
    """Owns the actors and the loop of one run (see module doc)."""

    def __init__(self, recipe: Recipe, run_dir: Path, model_path: str, train_prompts: list[Prompt],
                 eval_prompts: list[Prompt], val: ValSet | None = None):
        self.cfg, self.run_dir, self.model_path = recipe, run_dir, model_path
        self.train_prompts, self.eval_prompts, self.val = train_prompts, eval_prompts, val
        self.sampler = EpochSampler(len(train_prompts), recipe.seed)
        self.advantages = build_advantage_fn(recipe.algo.adv_std_scaling)
        self.loss_agg = build_loss_agg(recipe.algo.loss_agg, recipe.rollout.max_tokens)
        self.spec = SamplingSpec(n=recipe.rollout.group_size, max_tokens=recipe.rollout.max_tokens,
                                 temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p)
        self.probe_ids = [p.ids for p in train_prompts[:recipe.run.probe_prompts]]
        self.engines: list[Any] = []
        self.trainers: list[Any] = []
        self.reward: Any = None
        self.reward_names: list[str] = []
        self.sync_method = resolve_sync_method(recipe)
        self.asleep = False  # engines released their GPU memory for the trainer (rollout.sleep_level)

    # ----------------------------------------------------------------------------------------------------------
    def start_actors(self) -> None:
        """Create engines, trainer ranks and the reward pool.

        CPU: engines and trainers start in parallel. GPU: engines first, so that vLLM's memory profiling at start-up
        does not count a trainer's allocations as its own; then engines with sleep mode go to sleep until the first
        weight sync, so the trainer's start-up compilation (a full micro-batch, `TrainerWorker._compile_now`) has
        the memory a train phase has (2B with half the blocks recomputed: 70 GiB, which does not fit beside an
        awake engine on an 80 GB GPU). Placement (`sse_rl.placement`): with cuda_ipc, engine r
        and trainer rank r share bundle r of one group (one GPU each), then are checked to really share a device;
        otherwise the trainer ranks get a group of their own and the engines go where Ray's scheduler puts them.
        """
        c = self.cfg
        if self.sync_method == "cuda_ipc":
            engine_place = trainer_place = packed_group({"GPU": 1, "CPU": 2}, c.train.num_trainers,
                                                        "engine + trainer pairs (colocated)")
        else:
            engine_place = [{}] * c.rollout.num_engines
        engine_cls = ray.remote(num_cpus=1, num_gpus=c.rollout.num_gpus_per_engine)(RolloutWorker)
        self.engines = [engine_cls.options(**engine_place[i]).remote(
            self.model_path, dtype=c.rollout.dtype, max_model_len=c.rollout.max_model_len, seed=c.seed + i,
            enforce_eager=c.rollout.enforce_eager, gpu_memory_utilization=c.rollout.gpu_memory_utilization,
            tensor_parallel_size=c.rollout.tensor_parallel_size, cpu_kvcache_space_gib=c.rollout.cpu_kvcache_space_gib,
            enable_sleep_mode=c.rollout.sleep_level > 0, max_num_seqs=c.rollout.max_num_seqs,
        ) for i in range(c.rollout.num_engines)]
        if c.rollout.num_gpus_per_engine:
            ray.get([e.__ray_ready__.remote() for e in self.engines])
            self.release_engines()  # woken by run()'s first sync
        if self.sync_method != "cuda_ipc":  # after the engines: on one GPU they start first (see above)
            trainer_place = packed_group({"GPU": c.train.num_gpus_per_trainer, "CPU": 1}, c.train.num_trainers,
                                         "trainer ranks")
        trainer_cls = ray.remote(num_cpus=1, num_gpus=c.train.num_gpus_per_trainer)(TrainerWorker)
        self.trainers = [trainer_cls.options(**trainer_place[r]).remote(
            self.model_path, rank=r, world_size=c.train.num_trainers, train=c.train, algo=c.algo,
            temperature=c.rollout.temperature, seed=c.seed, dtype=c.model.dtype,
            gradient_checkpointing=c.model.gradient_checkpointing, checkpoint_every=c.model.checkpoint_every,
        ) for r in range(c.train.num_trainers)]
        self.reward = ray.remote(num_cpus=1)(RewardWorker).remote(c.reward)
        self.reward_names = ray.get(self.reward.function_names.remote())
        master = ray.get(self.trainers[0].address.remote())
        ray.get([t.join.remote(*master) for t in self.trainers] + [e.__ray_ready__.remote() for e in self.engines])
        if self.sync_method == "cuda_ipc":
            self._check_shared_gpus()
        if self.sync_method == "collective":
            weight_sync.connect(self.trainers, self.engines)

    def _check_shared_gpus(self) -> None:
        engines = ray.get([e.device_uuid.remote() for e in self.engines])
        trainers = ray.get([t.device_uuid.remote() for t in self.trainers])
        if engines != trainers:
            raise RuntimeError(f"rollout.weight_sync=cuda_ipc: engine r must share trainer rank r's GPU, got engine "
                               f"GPUs {engines} and trainer GPUs {trainers}")

    def restore(self) -> int:
        """Load the newest checkpoint into the trainers and the sampler; returns the step to continue after."""
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return 0
        state = checkpoint.load_state(path)
        ray.get([t.load.remote(str(path)) for t in self.trainers])
        self.sampler.load_state_dict(state["sampler"])
        return state["step"]

    def save(self, step: int) -> None:
        def write_trainer(tmp: Path) -> None:
            ray.get([t.save.remote(str(tmp)) for t in self.trainers])

        checkpoint.save(self.run_dir, step, write_trainer, {"sampler": self.sampler.state_dict()},
                        self.cfg.run.keep_checkpoints)

    def sync(self) -> dict[str, float]:
        """New weights into the engines (waking sleeping engines around it), then the logprob probe."""
        wake = self._wake(["weights"]) if self.asleep else 0.0
        seconds = weight_sync.push(self.trainers, self.engines, self.cfg.rollout.dtype, self.sync_method)
        if self.asleep:
            wake += self._wake(["kv_cache"])
            self.asleep = False
        diff = weight_sync.probe(self.trainers, self.engines[0], self.probe_ids)
        return {"time/sync": seconds, "time/engine_wake": wake, "probe/max_abs_diff": diff}

    def _wake(self, tags: list[str]) -> float:
        """Give sleeping engines back the memory named by `tags`; returns the seconds it took."""
        t0 = time.perf_counter()
        ray.get([e.wake_up.remote(tags) for e in self.engines])
        return time.perf_counter() - t0

    def release_engines(self) -> dict[str, float]:
        """Put GPU engines to sleep for the trainer's phase (rollout.sleep_level > 0); returns time/engine_sleep."""
        level = self.cfg.rollout.sleep_level
        if not level:
            return {}
        t0 = time.perf_counter()
        ray.get([e.sleep.remote(level) for e in self.engines])
        self.asleep = True
        return {"time/engine_sleep": time.perf_counter() - t0}

    def close(self) -> None:
        """End of a run: close the reward pool, release the actors (ray.shutdown covers failed runs)."""
        ray.get(self.reward.close.remote())
        for actor in [*self.engines, *self.trainers, self.reward]:
            ray.kill(actor)

    # ----------------------------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec, seed: int | None) -> list[list[Rollout]]:
        """Spread prompts over the engines (round-robin) and gather the completions in prompt order; engine i
        restarts its random stream from seed + i (None: continues it)."""
        n = len(self.engines)
        shards = [s for s in (range(len(prompt_ids))[i::n] for i in range(n)) if len(s)]
        calls = [e.generate.remote([prompt_ids[j] for j in s], spec, None if seed is None else seed + i)
                 for i, (e, s) in enumerate(zip(self.engines, shards))]
        out: list[list[Rollout]] = [[] for _ in prompt_ids]
        for shard, result in zip(shards, ray.get(calls)):
            for j, rollouts in zip(shard, result):
                out[j] = rollouts
        return out

    def score(self, prompts: list[Prompt], rollouts: list[list[Rollout]]) -> tuple[list[Group], dict[str, float]]:
        """Grade every completion; returns one Group per prompt and the pool's timeout/error counts."""
        flat = [(p, r) for p, rs in zip(prompts, rollouts) for r in rs]
        columns: dict[str, list[Any]] = {key: [p.columns[key] for p, _ in flat] for key in prompts[0].columns}
        columns["completion_ids"] = [r.completion_ids for _, r in flat]
        result = ray.get(self.reward.score.remote([p.text for p, _ in flat], [r.text for _, r in flat], columns))
        g = len(rollouts[0])

        def rows(values: list[float | None]) -> list[list[float]]:
            values = [0.0 if v is None else v for v in values]
            return [values[i:i + g] for i in range(0, len(values), g)]

        per_function = {name: rows(values) for name, values in result.per_function.items()}
        accuracy = per_function[self.reward_names[self.cfg.reward.accuracy]]
        groups = [Group(p, rs, total, acc, {name: v[i] for name, v in per_function.items()})
                  for i, (p, rs, total, acc) in enumerate(zip(prompts, rollouts, rows(result.total), accuracy))]
        return groups, {"reward/timeouts": float(result.timeouts), "reward/errors": float(len(result.errors))}

    def collect(self, step: int) -> tuple[list[Group], dict[str, float], list[int]]:
        """Generate and score rounds of prompts until `prompts_per_step` groups with signal (dynamic sampling).

        Returns the kept groups, rollout metrics and the dataset rows drawn (all rounds)."""
        c = self.cfg
        kept: list[Group] = []
        seen: list[Group] = []
        counts = {"time/rollout": 0.0, "time/reward": 0.0, "reward/timeouts": 0.0, "reward/errors": 0.0}
        drawn: list[int] = []
        generated = 0
        rounds = c.algo.max_sampling_rounds if c.algo.dynamic_sampling else 1
        for rnd in range(rounds):
            drawn += self.sampler.take(c.train.prompts_per_step)
            prompts = [self.train_prompts[i] for i in drawn[-c.train.prompts_per_step:]]
            t0 = time.perf_counter()
            rollouts = self.generate([p.ids for p in prompts], self.spec, call_seed(c.seed, step, rnd))
            t1 = time.perf_counter()
            generated += sum(len(r.completion_ids) for rs in rollouts for r in rs)
            groups, failures = self.score(prompts, rollouts)
            for key, value in {"time/rollout": t1 - t0, "time/reward": time.perf_counter() - t1, **failures}.items():
                counts[key] += value
            seen += groups
            signal = group_has_variance(torch.tensor([g.accuracy for g in groups])).tolist()
            kept += [g for g, ok in zip(groups, signal) if ok or not c.algo.dynamic_sampling]
            if len(kept) >= c.train.prompts_per_step:
                break
        metrics = {**counts, **_rollout_metrics(seen), "sampling/rounds": float(rnd + 1),
                   "throughput/rollout_tokens_per_s": generated / counts["time/rollout"],
                   "sampling/kept_groups": float(min(len(kept), c.train.prompts_per_step))}
        return kept[:c.train.prompts_per_step], metrics, drawn

    def batches(self, groups: list[Group]) -> list[list[list[MicroBatch]]]:
        """Advantages, loss weights and packing: per rank, per mini-batch, its micro-batches."""
        c = self.cfg
        adv = self.advantages(torch.tensor([g.rewards for g in groups])).tolist()  # [P][G]
        n_mini = min(c.algo.mini_batches, len(groups))
        per_rank: list[list[list[MicroBatch]]] = [[] for _ in range(c.train.num_trainers)]
        for j in range(n_mini):
            items = [(groups[i], adv[i][k], r) for i in range(j, len(groups), n_mini)
                     for k, r in enumerate(groups[i].rollouts)]
            keep = loss_keep_mask([r.finish_reason for _, _, r in items], c.algo.overlong_filter)  # [S]
            lengths = torch.tensor([len(r.completion_ids) for _, _, r in items]) * keep  # [S]
            weights = (self.loss_agg(lengths) * keep).tolist()  # [S]
            seqs = [Sequence(g.prompt.ids, r.completion_ids, r.logprobs, a, w)
                    for (g, a, r), w in zip(items, weights)]
            for rank, micro in enumerate(pack(seqs, c.train.token_budget, c.train.num_trainers)):
                per_rank[rank].append(micro)
        return per_rank

    def train(self, groups: list[Group]) -> dict[str, float]:
        """One update of the trainers on the kept groups; returns train/* metrics."""
        t0 = time.perf_counter()
        per_rank = self.batches(groups)
        packed = time.perf_counter() - t0
        results = ray.get([t.train.remote(b) for t, b in zip(self.trainers, per_rank)])
        seconds = time.perf_counter() - t0
        tokens = sum(mb.num_tokens for b in per_rank for mini in b for mb in mini)
        return {**_train_metrics(results), "time/train": seconds, "time/train_pack": packed,
                "throughput/train_tokens_per_s": tokens / seconds}

    def evaluate(self) -> dict[str, float]:
        """Mean reward and accuracy on the held-out prompts (one fixed seed, so every eval draws alike)."""
        c = self.cfg
        prompts = self.eval_prompts[:c.eval.num_prompts or None]
        spec = SamplingSpec(n=c.eval.samples, max_tokens=c.rollout.max_tokens, temperature=c.eval.temperature)
        rollouts = self.generate([p.ids for p in prompts], spec, call_seed(c.seed, -1))
        groups, _ = self.score(prompts, rollouts)
        return {"eval/reward": _mean([r for g in groups for r in g.rewards]),
                "eval/accuracy": _mean([a for g in groups for a in g.accuracy])}

    def validate(self, step: int) -> dict[str, float]:
        """The eval package on the validation benchmark: val/* metrics; completions and report in val/step_NNNN."""
        out = self.run_dir / "val" / f"step_{step:04d}"
        shutil.rmtree(out, ignore_errors=True)  # left by an interrupted attempt at this step
        t0 = time.perf_counter()
        metrics = evaluate_benchmark(
            self.sample_for_eval, self.val.problems, tokenizer=self.val.tokenizer,
            samples=self.cfg.eval.benchmark_samples, sampling=self.val.sampling, grader=self.grade_for_eval,
            benchmark=self.val.name, instruction="", chat_template=self.cfg.data.chat_template, out_dir=out)
        return {**metrics.flat("val/"), "time/val": time.perf_counter() - t0}

    def sample_for_eval(self, requests: list[GenRequest], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        """The engines as the eval package's GenerateFn: one sample per request.

        No seed: the engines' random streams continue. Training calls restart them from seeds of their own, so
        training samples do not depend on when validation ran.
        """
        if sampling.top_k:
            raise ValueError(f"the rollout engines sample without top-k, got top_k={sampling.top_k}")
        spec = SamplingSpec(n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p)
        rollouts = self.generate([r.prompt_token_ids for r in requests], spec, None)
        for i, (rollout,) in enumerate(rollouts):
            yield i, Generation(rollout.text, len(rollout.completion_ids), rollout.finish_reason)

    def grade_for_eval(self, completions: list[str], golds: list[str]) -> list[Grade]:
        """The eval package's Grader on the run's reward pool: the score is the accuracy function's value.

        For math recipes that is `math_accuracy`, what the eval package's own MathGrader scores, without a second
        pool of grading processes; a custom task is graded by its own accuracy reward (given `answer` only).
        The maj@k vote is the eval package's `extract_answer`.
        """
        result = ray.get(self.reward.score.remote([""] * len(completions), completions, {"answer": golds}))
        scores = result.per_function[self.reward_names[self.cfg.reward.accuracy]]
        return [Grade(score=s, pred=extract_answer(c)) for s, c in zip(scores, completions)]

    # ----------------------------------------------------------------------------------------------------------
    def step(self, step: int) -> tuple[dict[str, float], list[int]]:
        t0 = time.perf_counter()
        groups, metrics, drawn = self.collect(step)
        if groups:
            metrics.update(self.release_engines())
            metrics.update(self.train(groups))
            metrics.update(self.sync())
            weight_sync.check(metrics["probe/max_abs_diff"], self.cfg.run.probe_tolerance, step)
        metrics["time/step"] = time.perf_counter() - t0
        return metrics, drawn

    def run(self, start_step: int) -> Path:
        """Steps start_step+1 .. train.steps with eval/checkpoints; returns the path of the PNG of the curves."""
        c = self.cfg
        log = MetricsLog(self.run_dir, c.train.steps, start_step, tensorboard=c.run.tensorboard,
                         progress=c.run.progress)
        first = self.sync()
        weight_sync.check(first["probe/max_abs_diff"], c.run.probe_tolerance, start_step)
        if start_step == 0:
            log.log(0, {**first, **(self.evaluate() if self.eval_prompts else {}),
                        **(self.validate(0) if self.val else {})})
        for step in range(start_step + 1, c.train.steps + 1):
            metrics, drawn = self.step(step)
            last = step == c.train.steps
            if self.eval_prompts and (last or (c.eval.every and step % c.eval.every == 0)):
                metrics.update(self.evaluate())
            if self.val and (last or (c.eval.benchmark_every and step % c.eval.benchmark_every == 0)):
                metrics.update(self.validate(step))
            log.log(step, metrics)
            log.log_prompts(step, drawn)
            log.advance(metrics)
            if last or (c.run.save_every and step % c.run.save_every == 0):
                self.save(step)
        return log.close()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _rollout_metrics(groups: list[Group]) -> dict[str, float]:
    rewards = torch.tensor([r for g in groups for r in g.rewards])  # [B]
    lengths = [len(r.completion_ids) for g in groups for r in g.rollouts]
    truncated = [r.finish_reason == "length" for g in groups for r in g.rollouts]
    no_signal = (~group_has_variance(torch.tensor([g.accuracy for g in groups]))).float().mean()
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
           "accuracy": _mean([a for g in groups for a in g.accuracy]),
           "response_length/mean": _mean(lengths), "response_length/max": float(max(lengths)),
           "response_length/truncated_frac": _mean([float(t) for t in truncated]),
           "sampling/zero_variance_frac": float(no_signal)}
    for name in groups[0].per_function:
        out[f"reward/{name}/mean"] = _mean([v for g in groups for v in g.per_function[name]])
    return out


def _train_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """Merge the ranks' sums into per-token means."""
    total = {k: sum(r[k] for r in results) for k in results[0] if k not in ("is_max", "is_min")}
    tokens = max(total["tokens"], 1.0)
    first = results[0]  # grad norm, skipped, updates and lr are the same on every rank
    out = {"train/loss": total["loss"] / first["updates"], "train/entropy": total["entropy_sum"] / tokens,
           "train/clip_frac": (total["clip_low"] + total["clip_high"]) / tokens,
           "train/clip_low_frac": total["clip_low"] / tokens, "train/clip_high_frac": total["clip_high"] / tokens,
           "train/is_ratio_mean": total["is_sum"] / tokens, "train/is_ratio_max": max(r["is_max"] for r in results),
           "train/is_ratio_min": min(r["is_min"] for r in results), "train/mismatch": total["mismatch_sum"] / tokens,
           "train/aux_loss": total["aux_sum"] / first["updates"], "train/grad_norm": first["grad_norm"],
           "train/skipped_updates": first["skipped"], "train/lr": first["lr"],
           "train/graphs_compiled": max(r["graphs_compiled"] for r in results),
           # the slowest rank's split of time/train (the rest of it: packing and moving the batches to the ranks)
           **{f"time/train_{part}": max(r[f"time_{part}"] for r in results) for part in ("prepare", "updates",
                                                                                        "release")}}
    if total["kl_sum"]:
        out["train/kl"] = total["kl_sum"] / tokens
    if "gpu_free_gib" in first:  # GPU ranks: free memory at the step's start (after engines slept), peak allocated,
        out["train/gpu_free_gib"] = min(r["gpu_free_gib"] for r in results)  # and what a rank keeps reserved after
        out["train/gpu_peak_gib"] = max(r["gpu_peak_gib"] for r in results)  # the step, beside the woken engines
        out["train/gpu_kept_gib"] = max(r["gpu_kept_gib"] for r in results)
        out["train/gpu_alloc_retries"] = max(r["gpu_alloc_retries"] for r in results)
    return out
