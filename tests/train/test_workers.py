"""Ray workers on real parts: a vLLM engine with the SSE-H plugin, a gloo trainer rank, the reward pool.

One engine for the module (start-up is the slow part). Checks: seeded sampling is reproducible, weight sync makes
engine and trainer logprobs equal (and they differ before it) over the object store and the collective transport,
a sync that leaves a parameter out fails, a hanging or dying reward costs one sample, not the step.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from sse_rl.config import AlgoConfig, RewardConfig, RewardFunctionConfig, SamplingConfig, TrainConfig
from sse_rl.eval.engines import EngineSpec
from sse_rl.packing import Sequence, pack
from sse_rl.weight_sync import probe
from sse_rl.weight_sync.collective import Collective
from sse_rl.weight_sync.object_store import ObjectStore
from sse_rl.workers.reward import RewardWorker
from sse_rl.workers.rollout import RolloutWorker
from sse_rl.workers.trainer import TrainerWorker

pytestmark = pytest.mark.slow  # Ray actors, a vLLM engine

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def actors(policy):
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}})
    engine = ray.remote(num_cpus=1)(RolloutWorker).remote(EngineSpec(
        policy, dtype="float32", max_model_len=64, seed=0, enforce_eager=True, gpu_memory_utilization=0.5,
        tensor_parallel_size=1, max_num_seqs=256, cpu_kvcache_space_gib=1))
    trainer = ray.remote(num_cpus=1)(TrainerWorker).remote(
        policy, rank=0, world_size=1, train=TrainConfig(lr=1e-2), algo=AlgoConfig(), temperature=1.0, seed=0,
        dtype="float32", gradient_checkpointing=False)
    ray.get([engine.__ray_ready__.remote(), trainer.join.remote(*ray.get(trainer.address.remote()))])
    yield engine, trainer
    ray.shutdown()


PROMPTS = [[12, 13, 14, 15, 11, 17, 5, 17, 7, 16, 18], [12, 13, 14, 15, 3, 17, 4, 17, 2, 16, 18], [15, 2, 16, 18]]


def test_seeded_calls_are_reproducible(actors):
    """A seed restarts the engine's random stream: the same call with the same seed draws the same completions,
    whatever unseeded calls ran in between; another seed, or no seed, draws anew."""
    engine, _ = actors
    sampling = SamplingConfig(n=4, max_tokens=6, temperature=1.0)
    ids = lambda out: [[r.completion_ids for r in group] for group in out]  # noqa: E731
    first = ray.get(engine.generate.remote(PROMPTS, sampling, 1))
    unseeded = [ray.get(engine.generate.remote(PROMPTS, sampling, None)) for _ in range(2)]
    again = ray.get(engine.generate.remote(PROMPTS, sampling, 1))
    other = ray.get(engine.generate.remote(PROMPTS, sampling, 2))
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert ids(unseeded[0]) != ids(unseeded[1]) and [len(g) for g in unseeded[0]] == [4, 4, 4]
    for group in first:
        assert len(group) == 4
        for r in group:
            assert 1 <= len(r.completion_ids) <= 6 and len(r.logprobs) == len(r.completion_ids)
            assert all(lp <= 0 for lp in r.logprobs) and r.finish_reason in ("stop", "length")


def test_ignore_eos_samples_every_completion_to_max_tokens(actors, policy):
    """The random tiny policy (a vocabulary of a few dozen tokens) often samples EOS within 24 tokens: those
    completions stop there, unless ignore_eos, which samples on to max_tokens with EOS inside, each token with its
    logprob (bench/mismatch.py's responses of one length)."""
    from transformers import AutoTokenizer

    engine, _ = actors
    eos = AutoTokenizer.from_pretrained(policy).eos_token_id
    plain = ray.get(engine.generate.remote(PROMPTS, SamplingConfig(n=4, max_tokens=24, temperature=1.0), 5))
    assert any(r.finish_reason == "stop" and len(r.completion_ids) < 24 for group in plain for r in group)
    forced = ray.get(engine.generate.remote(
        PROMPTS, SamplingConfig(n=4, max_tokens=24, temperature=1.0, ignore_eos=True), 5))
    for group in forced:
        for r in group:
            assert len(r.completion_ids) == len(r.logprobs) == 24 and r.finish_reason == "length"
    assert any(eos in r.completion_ids[:-1] for group in forced for r in group)


def test_rollout_texts_and_logprobs_equal_vllm_defaults(actors):
    """The worker asks vLLM for token ids only and flat logprobs, and decodes the texts itself: texts and logprobs
    are those of vLLM's default outputs (detokenized text, a dict of `Logprob`s per token), and its seed is that of
    a freshly seeded engine."""
    engine, _ = actors
    sampling = SamplingConfig(n=4, max_tokens=12, temperature=1.0)

    def vllm_texts(worker: RolloutWorker) -> list:  # runs in the actor (defined here: pickled by value)
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        torch.manual_seed(4)
        params = SamplingParams(n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                logprobs=0)
        outputs = worker.llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        return [[(list(c.token_ids), c.text, [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)])
                 for c in out.outputs] for out in outputs]

    ours = ray.get(engine.generate.remote(PROMPTS, sampling, 4))
    assert [[(r.completion_ids, r.text, r.logprobs) for r in group] for group in ours] == ray.get(
        engine.__ray_call__.remote(vllm_texts))
    assert any(r.text for group in ours for r in group)


def _update_trainer(engine, trainer, seed: int) -> None:
    """One policy update on the engine's own samples: afterwards engine and trainer disagree."""
    rollouts = ray.get(engine.generate.remote(PROMPTS, SamplingConfig(n=4, max_tokens=4, temperature=1.0), seed))
    seqs = [Sequence(p, r.completion_ids, r.logprobs, advantage=1.0 if k % 2 else -1.0, weight=1 / 40)
            for p, group in zip(PROMPTS, rollouts) for k, r in enumerate(group)]
    stats = ray.get(trainer.train.remote([pack(seqs, 256)[0]]))
    assert stats.updates == 1 and stats.skipped == 0 and stats.tokens == sum(len(s.completion_ids) for s in seqs)
    stale = probe([trainer], engine, PROMPTS)
    assert stale > 1e-3, "the update should have moved the policy away from the engine's weights"


def test_weight_sync_makes_engine_and_trainer_agree(actors):
    engine, trainer = actors
    transport = ObjectStore("float32")
    transport.connect([trainer], [engine])
    assert probe([trainer], engine, PROMPTS) < 1e-4  # same initial checkpoint
    _update_trainer(engine, trainer, seed=0)
    assert transport.push([trainer], [engine]) > 0
    assert probe([trainer], engine, PROMPTS) < 1e-4


def test_a_sync_that_leaves_a_parameter_out_fails(actors):
    """Every engine must write every parameter: a transport whose weights miss one stops the run, naming it."""
    engine, trainer = actors

    class WithoutFinalNorm(ObjectStore):  # defined here, so Ray's workers get it by value
        def send(self, trainer):
            state = super().send(trainer)
            state.pop("model.norm.weight", None)  # a layer of its own: the rest of the update is valid
            return state

    transport = WithoutFinalNorm("float32")
    transport.connect([trainer], [engine])
    total = ray.get(engine.num_parameters.remote())
    with pytest.raises(RuntimeError, match=f"engine 0 updated {total - 1} of its {total} parameters"):
        transport.push([trainer], [engine])


def test_collective_weight_sync_broadcasts_over_its_own_group(actors):
    """rollout.weight_sync=collective: trainer rank 0 broadcasts flat buffers to the engine over a gloo group of
    their own (NCCL on GPU), beside the trainer's default group and vLLM's."""
    engine, trainer = actors
    transport = Collective("float32")
    transport.connect([trainer], [engine])
    for seed in (10, 20):  # the group is reused step after step
        _update_trainer(engine, trainer, seed)
        transport.push([trainer], [engine])
        assert probe([trainer], engine, PROMPTS) < 1e-4


def test_hanging_and_dying_rewards_cost_one_sample(actors):
    spec = f"{HERE / 'misbehaving_reward.py'}:misbehaving_reward"
    worker = ray.remote(num_cpus=1)(RewardWorker).remote(
        RewardConfig(functions=[RewardFunctionConfig(spec=spec)], num_workers=2, timeout_s=1.0))
    completions = ["fine", "hang", "die", "also fine"]
    start = time.perf_counter()
    result = ray.get(worker.score.remote(["p"] * 4, completions, answer=["1"] * 4))
    seconds = time.perf_counter() - start
    assert result.total == [1.0, 0.0, 0.0, 1.0]
    assert result.timeouts == 1 and sorted(e.kind for e in result.errors) == ["timeout", "worker_died"]
    assert seconds < 1.0 + 6.0, f"scoring took {seconds:.1f} s with a 1 s timeout"
    again = ray.get(worker.score.remote(["p"] * 2, ["ok", "ok"], answer=["1"] * 2))
    assert again.total == [1.0, 1.0] and again.timeouts == 0
    ray.get(worker.close.remote())
