"""The single controller: the GRPO step loop, each phase a named call, in order.

One step: sample rounds of prompts (engines generate G completions each, the reward pool grades them) until enough
groups have signal (`rollouts.collect`) -> the engines sleep -> advantages and packing (`rollouts.batches`) -> the
trainer ranks update (`StepStats`, merged over ranks) -> weight sync + probe (`Actors.sync`) -> log, checkpoint,
eval. The controller holds token ids, rewards and metrics, never model tensors. Where the actors are and how they are
reached: `sse_rl.actors`; how weights travel: `sse_rl.weight_sync`.

Two evals: `evaluate` (mean reward on the held-out prompts of data.eval, eval/*) and `validate` (the eval package on
the eval.benchmark problems: avg@n, pass@k, maj@k as val/*, report files in OUT_DIR/val/step_NNNN). Both sample with
the run's engines and grade with the run's reward pool, so they cost no extra processes; validation grades through
the eval package's one grader (`RewardGrader`) over that pool.

What stops a run (`sse_rl.grpo.guard`): a non-finite reward (unless reward.non_finite is "zero": scored 0, counted),
advantage or probe difference, non-finite weights after an update (before they are synced or saved),
`train.max_skipped_steps` updates in a row skipped for a non-finite loss or gradient, `train.max_empty_steps` steps in
a row that train nothing. `RunStopped` names the step, the quantity and the newest checkpoint, which holds finite
weights (none are saved after a fault) and is the one to resume from.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sse_rl import actors, checkpoint, rollouts, weight_sync
from sse_rl.config import Recipe
from sse_rl.data import EpochSampler, Prompt
from sse_rl.eval import Generation, GenRequest, Problem, RewardGrader, SamplingConfig
from sse_rl.eval import evaluate as evaluate_benchmark
from sse_rl.grpo.advantages import build_advantage_fn
from sse_rl.grpo.guard import NonFiniteError, RunStopped, StreakLimit
from sse_rl.grpo.losses import build_loss_agg
from sse_rl.metrics_log import MetricsLog, completion_rows
from sse_rl.rewards.calling import TrainerState
from sse_rl.rewards.pool import RewardResult
from sse_rl.rollouts import Group, Round, call_seed
from sse_rl.step_stats import StepStats
from sse_rl.workers.rollout import Rollout

logger = logging.getLogger(__name__)


@dataclass
class ValSet:
    """The validation benchmark of a run (eval.benchmark), resolved at start-up by `sse_rl.train.load_val_set`."""

    name: str  # benchmark name in the eval package's reports (the file stem for a local file)
    problems: list[Problem]  # problem text already rendered with data.prompt_template
    tokenizer: Any  # renders (data.chat_template) and tokenizes the prompts
    sampling: SamplingConfig


class Controller:
    """The loop of one run (see module doc)."""

    def __init__(self, recipe: Recipe, run_dir: Path, model_path: str, train_prompts: list[Prompt],
                 eval_prompts: list[Prompt], val: ValSet | None = None):
        self.cfg, self.run_dir, self.model_path = recipe, run_dir, model_path
        self.train_prompts, self.eval_prompts, self.val = train_prompts, eval_prompts, val
        self.sampler = EpochSampler(len(train_prompts), recipe.seed)
        self.advantages = build_advantage_fn(recipe.algo.adv_std_scaling)
        self.loss_agg = build_loss_agg(recipe.algo.loss_agg, recipe.rollout.max_tokens)
        self.sampling = SamplingConfig(n=recipe.rollout.group_size, max_tokens=recipe.rollout.max_tokens,
                                       temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p)
        self.probe_ids = [p.ids for p in train_prompts[:recipe.run.probe_prompts]]
        self.actors: actors.Actors | None = None
        self.log: MetricsLog | None = None  # opened by `run`
        self.skipped = StreakLimit(recipe.train.max_skipped_steps)
        self.empty = StreakLimit(recipe.train.max_empty_steps)

    def start_actors(self) -> None:
        self.actors = actors.start(self.cfg, self.model_path)

    def restore(self) -> int:
        """Load the newest checkpoint into the trainers and the sampler; returns the step to continue after."""
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return 0
        state = checkpoint.load_state(path)
        self.actors.load(str(path))
        self.sampler.load_state_dict(state["sampler"])
        return state["step"]

    def save(self, step: int) -> None:
        checkpoint.save(self.run_dir, step, lambda tmp: self.actors.save(str(tmp)),
                        {"sampler": self.sampler.state_dict()}, self.cfg.run.keep_checkpoints)

    def close(self) -> None:
        self.actors.close()

    # ----------------------------------------------------------------------------------------------------------
    def run(self, start_step: int) -> Path:
        """Steps start_step+1 .. train.steps with eval/checkpoints; returns the path of the PNG of the curves."""
        c = self.cfg
        log = self.log = MetricsLog(self.run_dir, c.train.steps, start_step, report_to=c.run.report_to,
                                    config=dataclasses.asdict(c), progress=c.run.progress)
        step = start_step
        try:
            first = self.sync(step)
            if start_step == 0:
                log.log(0, {**first, **(self.evaluate(0) if self.eval_prompts else {}),
                            **(self.validate(0) if self.val else {})})
            for step in range(start_step + 1, c.train.steps + 1):
                metrics, drawn = self.step(step)
                last = step == c.train.steps
                if self.eval_prompts and (last or (c.eval.every and step % c.eval.every == 0)):
                    metrics.update(self.evaluate(step))
                if self.val and (last or (c.eval.benchmark_every and step % c.eval.benchmark_every == 0)):
                    metrics.update(self.validate(step))
                log.log(step, metrics)
                log.log_prompts(step, drawn)
                log.advance(metrics)
                if last or (c.run.save_every and step % c.run.save_every == 0):
                    self.save(step)
        except NonFiniteError as err:
            raise self.stopped(step, str(err)) from err
        return log.close()

    def stopped(self, step: int, what: str) -> RunStopped:
        """The error that ends the run at `step` because of `what`; it says which checkpoint to resume from."""
        latest = checkpoint.latest(self.run_dir)
        resume = f"resume from {latest} with --resume" if latest else "no checkpoint was saved"
        return RunStopped(f"run stopped at step {step}: {what}. Nothing of this step was synced or saved; {resume} "
                          "after fixing the cause")

    def step(self, step: int) -> tuple[dict[str, float], list[int]]:
        """One GRPO step; returns its metrics and the dataset rows it drew."""
        t0 = time.perf_counter()
        a = self.cfg.algo
        groups, metrics, drawn = rollouts.collect(
            self.sampler, self.train_prompts, lambda prompts, rnd: self.sample_round(prompts, step, rnd),
            prompts_per_step=self.cfg.train.prompts_per_step, dynamic=a.dynamic_sampling,
            max_rounds=a.max_sampling_rounds)
        self.check_signal(step, groups)
        self.log_completions(step, groups)
        if groups:
            metrics.update(self.actors.sleep())
            metrics.update(self.train(step, groups))
            metrics.update(self.sync(step))
        metrics["time/step"] = time.perf_counter() - t0
        return metrics, drawn

    def log_completions(self, step: int, groups: list[Group]) -> None:
        """run.log_completions completions of the step's kept groups with their scores and advantages
        (`metrics_log.completion_rows`), drawn from a seed of the step."""
        n = self.cfg.run.log_completions
        if n and groups:
            advantages = self.advantages(torch.tensor([g.rewards for g in groups])).tolist()  # [P][G]
            rows = completion_rows(step, groups, advantages, n, call_seed(self.cfg.seed, step))
            self.log.log_completions(step, rows)

    def sync(self, step: int) -> dict[str, float]:
        """New weights into the engines, then the probe, checked (`weight_sync.check`); returns their metrics."""
        metrics = self.actors.sync(self.probe_ids)
        weight_sync.check(metrics["probe/max_abs_diff"], self.cfg.run.probe_tolerance, step)
        return metrics

    def check_signal(self, step: int, groups: list[Group]) -> None:
        """Warn on a step that trains nothing (no kept group whose rewards vary); stop at train.max_empty_steps."""
        if rollouts.has_signal(groups):
            self.empty.record(False)
            return
        limit = self.cfg.train.max_empty_steps
        if self.empty.record(True):
            raise self.stopped(step, f"{limit} steps in a row trained nothing: no kept group had rewards that vary "
                                     "(every group all right, all wrong or filtered; check the reward functions, "
                                     "the data and algo.max_sampling_rounds)")
        logger.warning("step %d trains nothing: %d kept groups, none with rewards that vary (%d such steps in a row; "
                       "the run stops at train.max_empty_steps=%d)", step, len(groups), self.empty.count, limit)

    def check_update(self, step: int, stats: StepStats) -> None:
        """Stop on non-finite weights after the update (before they are synced or saved), or after
        train.max_skipped_steps steps in a row whose update was skipped for a non-finite loss or gradient."""
        if stats.nonfinite_weights:
            raise self.stopped(step, f"weights after the update: {int(stats.nonfinite_weights)} non-finite values "
                                     f"(train/grad_norm {stats.grad_norm}, train/lr {stats.lr})")
        if self.skipped.record(stats.skipped > 0):
            raise self.stopped(step, f"{self.skipped.limit} steps in a row skipped their update for a non-finite "
                                     f"loss or gradient (train/loss {stats.loss}, train/grad_norm {stats.grad_norm})")
        if stats.skipped:
            logger.warning("step %d: %d of %d updates skipped for a non-finite loss or gradient (%d such steps in a "
                           "row; the run stops at train.max_skipped_steps=%d)", step, stats.skipped, stats.updates,
                           self.skipped.count, self.skipped.limit)

    def sample_round(self, prompts: list[Prompt], step: int, rnd: int) -> Round:
        """Round `rnd` of a step's sampling: G completions per prompt from a seed of the call's own, graded."""
        t0 = time.perf_counter()
        sampled = self.actors.generate([p.ids for p in prompts], self.sampling, call_seed(self.cfg.seed, step, rnd))
        t1 = time.perf_counter()
        groups, result = self.score(prompts, sampled, step)
        return Round(groups, t1 - t0, time.perf_counter() - t1, result.timeouts, len(result.errors), result.skipped,
                     result.non_finite, result.retried, result.logged)

    def score(self, prompts: list[Prompt], sampled: list[list[Rollout]],
              step: int) -> tuple[list[Group], RewardResult]:
        """Grade every completion with the reward pool (rewards see `step` as TRL's trainer_state.global_step): one
        Group per prompt, and the pool's result."""
        texts, completions, columns = rollouts.reward_inputs(prompts, sampled)
        state = TrainerState(global_step=step, max_steps=self.cfg.train.steps)
        result = self.actors.score(texts, completions, trainer_state=state, **columns)
        accuracy = self.actors.reward_names[self.cfg.reward.accuracy]
        return rollouts.to_groups(prompts, sampled, result, accuracy), result

    def train(self, step: int, groups: list[Group]) -> dict[str, float]:
        """One update of the trainers on the kept groups, checked (`check_update`); returns train/* metrics."""
        c = self.cfg
        t0 = time.perf_counter()
        per_rank = rollouts.batches(groups, self.advantages, self.loss_agg, mini_batches=c.algo.mini_batches,
                                    overlong_filter=c.algo.overlong_filter, token_budget=c.train.token_budget,
                                    num_ranks=c.train.num_trainers)
        packed = time.perf_counter() - t0
        stats = StepStats.merge(self.actors.train(per_rank))
        self.check_update(step, stats)
        seconds = time.perf_counter() - t0
        tokens = sum(mb.num_tokens for b in per_rank for mini in b for mb in mini)
        return {**stats.to_metrics(), "time/train": seconds, "time/train_pack": packed,
                "throughput/train_tokens_per_s": tokens / seconds}

    # ----------------------------------------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """Mean reward and accuracy on the held-out prompts (one fixed seed, so every eval draws alike)."""
        c = self.cfg
        prompts = self.eval_prompts[:c.eval.num_prompts or None]
        sampling = SamplingConfig(n=c.eval.samples, max_tokens=c.rollout.max_tokens, temperature=c.eval.temperature)
        sampled = self.actors.generate([p.ids for p in prompts], sampling, call_seed(c.seed, -1))
        groups, _ = self.score(prompts, sampled, step)
        return {"eval/reward": rollouts.mean([r for g in groups for r in g.rewards if not math.isnan(r)]),
                "eval/accuracy": rollouts.mean([a for g in groups for a in g.accuracy])}

    def validate(self, step: int) -> dict[str, float]:
        """The eval package on the validation benchmark: val/* metrics; completions and report in val/step_NNNN.

        The score is the recipe's accuracy reward from the run's reward pool: for math recipes `math_accuracy`, what
        the eval package's own MathGrader scores, without a second pool of grading processes; a custom task is graded
        by its own accuracy reward (given `answer` only).
        """
        out = self.run_dir / "val" / f"step_{step:04d}"
        shutil.rmtree(out, ignore_errors=True)  # left by an interrupted attempt at this step
        t0 = time.perf_counter()
        state = TrainerState(global_step=step, max_steps=self.cfg.train.steps)
        grader = RewardGrader(functools.partial(self.actors.score, trainer_state=state),
                              self.actors.reward_names[self.cfg.reward.accuracy])
        metrics = evaluate_benchmark(
            self.sample_for_eval, self.val.problems, tokenizer=self.val.tokenizer,
            samples=self.cfg.eval.benchmark_samples, sampling=self.val.sampling, grader=grader,
            benchmark=self.val.name, instruction="", chat_template=self.cfg.data.chat_template, out_dir=out)
        return {**metrics.flat("val/"), "time/val": time.perf_counter() - t0}

    def sample_for_eval(self, requests: list[GenRequest], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        """The engines as the eval package's GenerateFn: one sample per request.

        No seed: the engines' random streams continue. Training calls restart them from seeds of their own, so
        training samples do not depend on when validation ran.
        """
        sampled = self.actors.generate([r.prompt_token_ids for r in requests], sampling, None)
        for i, (rollout,) in enumerate(sampled):
            yield i, Generation(rollout.text, len(rollout.completion_ids), rollout.finish_reason)
