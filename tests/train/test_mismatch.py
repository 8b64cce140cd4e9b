"""The rollout/trainer mismatch statistics, route carrying through packing, routing replay in the trainer, and the
fp32 LM head (issue #28): plain tensors and a tiny SSE-H trainer on CPU, no engine."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sse_rl.config import AlgoConfig, TrainConfig
from sse_rl.grpo import mismatch
from sse_rl.models.layers import NO_ROUTE
from sse_rl.packing import Sequence, pack
from sse_rl.step_stats import StepStats


def test_logprob_stats_count_only_weighted_tokens_by_position():
    n = 1100
    rollout = torch.zeros(n)
    trainer = torch.full((n,), -0.01)  # |delta| 0.01 everywhere ...
    trainer[1030:] = -0.5  # ... 0.5 in the 1024+ bucket
    weights = torch.full((n,), 1e-3)
    weights[:10] = 0.0  # not trained: not counted
    seq_ids = torch.zeros(n, dtype=torch.long)
    fields = mismatch.logprob_stats(trainer, rollout, weights, seq_ids, torch.arange(n))
    stats = StepStats(**fields).on_host()
    metrics = stats._mismatch_metrics()
    key = "mismatch/abs_logprob_diff"
    assert metrics["mismatch/tokens"] == n - 10
    assert metrics[f"{key}/pos_0_63"] == pytest.approx(0.01)
    assert metrics[f"{key}/pos_1024_plus"] == pytest.approx((6 * 0.01 + 70 * 0.5) / 76)
    assert metrics[f"{key}/mean"] == pytest.approx((1020 * 0.01 + 70 * 0.5) / 1090, rel=1e-5)
    assert 0.5 <= metrics[f"{key}/p99"] < 0.5 * 10 ** (1 / 16) * 1.0001  # 70 of 1090 tokens sit at 0.5
    # one sequence: its summed log(rollout / trainer) and k3 = exp(-d) - 1 + d
    d = (rollout - trainer)[10:]
    assert metrics["mismatch/seq_kl_k1"] == pytest.approx(float(d.sum()), rel=1e-5)
    assert metrics["mismatch/seq_kl_k3"] == pytest.approx(float((torch.exp(-d) - 1 + d).sum()), rel=1e-4)


def test_histogram_quantile_and_rank_merge():
    values = torch.tensor([1e-3] * 98 + [0.2, 3.0])
    per_rank = [StepStats(**mismatch.logprob_stats(-part, torch.zeros(len(part)), torch.ones(len(part)),
                                                   torch.arange(len(part)), torch.arange(len(part))))
                for part in (values[:60], values[60:])]
    merged = StepStats.merge([s.on_host() for s in per_rank])
    assert isinstance(merged.mismatch_hist, torch.Tensor) and float(merged.mismatch_hist.sum()) == 100
    assert merged.mismatch_sequences == 100  # one token per sequence here
    assert 0.2 <= mismatch.quantile(merged.mismatch_hist, 0.99) <= 0.2 * 10 ** (1 / 16) * 1.0001
    assert math.isnan(mismatch.quantile(torch.zeros(5), 0.5))
    assert StepStats.merge([StepStats(), StepStats()]).mismatch_hist is None


def test_route_flips_compare_sets_and_skip_unrecorded():
    engine = torch.tensor([[[0, 1], [2, 3]], [[1, 0], [NO_ROUTE, NO_ROUTE]], [[3, 2], [0, 1]]], dtype=torch.uint8)
    trainer = torch.tensor([[[1, 0], [2, 1]], [[0, 1], [0, 1]], [[2, 3], [1, 0]]], dtype=torch.uint8)
    out = mismatch.route_stats(engine, trainer)  # pairs: 5 recorded, of which [0, 1] differs as a set
    assert float(out["route_pairs"]) == 5 and float(out["route_flips"]) == 1


def _sequences(rng: np.random.Generator, n: int, vocab: int = 19) -> list[Sequence]:
    seqs = []
    for _ in range(n):
        prompt = rng.integers(2, vocab, int(rng.integers(3, 9))).tolist()
        completion = rng.integers(1, vocab, int(rng.integers(2, 7))).tolist()
        seqs.append(Sequence(prompt, completion, [-2.0] * len(completion), float(rng.uniform(-1, 1)), 0.05))
    return seqs


def test_packing_lays_routes_along_the_tokens():
    rng = np.random.default_rng(0)
    seqs = _sequences(rng, 5)
    for s in seqs[:4]:  # the engine's layout: one position short (the last sampled token)
        s.routes = rng.integers(0, 4, (len(s) - 1, 3, 1)).astype(np.uint8)
    (mb,) = pack(seqs, token_budget=1000)[0]
    assert mb.routes.shape == (1, mb.num_tokens, 3, 1) and mb.routes.dtype == torch.uint8
    for s, start, end in zip(seqs, mb.cu_seqlens[:-1].tolist(), mb.cu_seqlens[1:].tolist()):
        rows = mb.routes[0, start:end].numpy()
        if s.routes is None:
            assert (rows == NO_ROUTE).all()
        else:
            assert (rows[:-1] == s.routes).all() and (rows[-1] == NO_ROUTE).all()
    assert mb.response_pos.tolist() == [j for s in seqs for j in range(len(s.completion_ids))]
    assert pack(_sequences(rng, 2), token_budget=1000)[0][0].routes is None


# ---------------------------------------------------------------------------------------------------------------
def _trainer(policy: str, replay: bool, **kw):
    from sse_rl.workers.trainer import TrainerWorker

    # micro-steps only (no process group); no aux loss: the loss compared is the policy loss
    return TrainerWorker(policy, rank=0, world_size=1, train=TrainConfig(lr=1e-3, strategy="ddp"),
                         algo=AlgoConfig(aux_loss_coef=0.0, routing_replay=replay), temperature=1.0, seed=0,
                         dtype=kw.pop("dtype", "float32"), gradient_checkpointing=False, **kw)


@pytest.fixture(scope="module")
def replaying(policy):
    return _trainer(policy, replay=True)


@pytest.fixture(scope="module")
def measuring(policy):
    return _trainer(policy, replay=False)


def _own_routes(model, seq: Sequence) -> np.ndarray:
    """The policy's own partitions for `seq`, in the engine's layout (the last token unrecorded)."""
    with torch.no_grad():
        routes = model(input_ids=torch.tensor([seq.prompt_ids + seq.completion_ids]), output_routes=True).routes[0]
    return routes[:-1].numpy()


def _other(routes: np.ndarray, n: int = 4) -> np.ndarray:
    return ((routes.astype(np.int64) + 1) % n).astype(np.uint8)


def _micro_step(trainer, mb) -> StepStats:
    from sse_rl.workers.trainer import _Extra

    trainer.model.zero_grad()
    stats = trainer._micro_step(mb, _Extra(None, None)).on_host()
    trainer.model.zero_grad()
    return stats


def test_replayed_own_routes_leave_the_loss_unchanged(replaying):
    seqs = _sequences(np.random.default_rng(1), 6)
    (plain,) = pack(seqs, token_budget=1000)[0]
    for s in seqs:
        s.routes = _own_routes(replaying.model, s)
    (replayed,) = pack(seqs, token_budget=1000)[0]
    a, b = _micro_step(replaying, plain), _micro_step(replaying, replayed)
    assert b.loss == pytest.approx(a.loss, rel=1e-6, abs=1e-9)
    assert b.route_pairs == sum(len(s) - 1 for s in seqs) * 3 and b.route_flips == 0
    assert a.route_pairs == 0


def test_replay_makes_the_trainers_routes_the_engines(replaying, measuring):
    seqs = _sequences(np.random.default_rng(2), 5)
    for s in seqs:
        s.routes = _other(_own_routes(measuring.model, s))  # an engine that chose otherwise everywhere
    (mb,) = pack(seqs, token_budget=1000)[0]
    *_, used = replaying._forward(replaying.model, mb)
    recorded = mb.routes != NO_ROUTE
    assert torch.equal(used[recorded], mb.routes[recorded])
    replayed, own = _micro_step(replaying, mb), _micro_step(measuring, mb)
    assert replayed.route_flips == 0 and own.route_flips == own.route_pairs > 0
    assert replayed.loss != pytest.approx(own.loss, rel=1e-6)  # the replayed partitions change the logprobs
    metrics = dataclasses.replace(replayed, updates=1.0).to_metrics()
    assert metrics["mismatch/route_flip_rate"] == 0 and "mismatch/abs_logprob_diff/p99" in metrics


def test_packed_replay_equals_each_sequence_alone(replaying):
    from sse_rl.grpo.logprobs import logprobs_and_entropy

    seqs = _sequences(np.random.default_rng(3), 7)
    for s in seqs:
        s.routes = _other(_own_routes(replaying.model, s))
    micro = pack(seqs, token_budget=30)[0]
    assert len(micro) >= 2
    with torch.no_grad():
        packed = torch.cat([replaying._forward(replaying.model, mb)[0] for mb in micro])
        order = [i for mb in micro for i in _members(mb, seqs)]
        alone = []
        for i in order:
            s = seqs[i]
            routes = np.concatenate([s.routes, np.full((1, *s.routes.shape[1:]), NO_ROUTE, np.uint8)])
            logits = replaying.model(input_ids=torch.tensor([s.prompt_ids + s.completion_ids]),
                                     routes=torch.from_numpy(routes)[None]).logits[0]
            n = len(s.prompt_ids)
            alone.append(logprobs_and_entropy(logits[n - 1:n - 1 + len(s.completion_ids)],
                                              torch.tensor(s.completion_ids))[0])
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def _members(mb, seqs: list[Sequence]) -> list[int]:
    """Which of `seqs` a micro-batch holds, in order (matched by their tokens)."""
    ids, bounds = mb.input_ids[0].tolist(), mb.cu_seqlens.tolist()
    pieces = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    return [next(i for i, s in enumerate(seqs) if s.prompt_ids + s.completion_ids == p) for p in pieces]


# ---------------------------------------------------------------------------------------------------------------
def test_lm_head_fp32_logits_are_fp32_and_closer_to_the_fp32_reference(policy):
    from transformers import AutoModelForCausalLM

    import sse_rl.models  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    ids = torch.randint(1, 19, (2, 40))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        errors = {}
        for fp32 in (False, True):
            model.config.lm_head_fp32 = fp32
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=ids).logits
            assert logits.dtype == (torch.float32 if fp32 else torch.bfloat16)
            errors[fp32] = float((logits.float() - reference).abs().mean())
    assert errors[True] < errors[False], errors


def test_trainer_lm_head_fp32_in_bf16_is_closer_to_fp32(policy, measuring):
    """A bf16 (autocast) trainer's logprobs with the fp32 head are nearer the fp32 trainer's than without it."""
    seqs = _sequences(np.random.default_rng(4), 6)
    (mb,) = pack(seqs, token_budget=1000)[0]
    with torch.no_grad():
        reference = measuring._forward(measuring.model, mb)[0]
        errors = {}
        for fp32 in (False, True):
            trainer = _trainer(measuring.model.name_or_path, replay=False, dtype="bfloat16", lm_head_fp32=fp32)
            errors[fp32] = float((trainer._forward(trainer.model, mb)[0] - reference).abs().mean())
    assert errors[True] < errors[False], errors
