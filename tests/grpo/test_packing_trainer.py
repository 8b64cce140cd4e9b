"""Packing by token budget, and the trainer's packed loss/gradients against an unpacked per-sequence reference."""
from __future__ import annotations

import copy
import math
import pickle
import random

import pytest
import torch

from sse_rl.config import AlgoConfig, TrainConfig
from sse_rl.grpo.logprobs import logprobs_and_entropy
from sse_rl.grpo.losses import build_loss_agg
from sse_rl.packing import Sequence, pack
from sse_rl.step_stats import StepStats
from trainer_ranks import free_port, run_ranks


def _sequences(n: int, seed: int = 0, vocab: int = 19) -> list[Sequence]:
    rng = random.Random(seed)
    seqs = []
    for _ in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(3, 11))]
        completion = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))]
        logprobs = [-rng.uniform(1.5, 4.0) for _ in completion]
        seqs.append(Sequence(prompt, completion, logprobs, advantage=rng.uniform(-1, 1), weight=0.0))
    return seqs


def test_pack_respects_budget_and_keeps_every_token():
    seqs = _sequences(23)
    per_rank = pack(seqs, token_budget=40, num_ranks=3)
    micro = [mb for rank in per_rank for mb in rank]
    assert all(mb.num_tokens <= 40 for mb in micro)
    assert sum(mb.num_tokens for mb in micro) == sum(len(s) for s in seqs)
    assert sum(mb.targets.numel() for mb in micro) == sum(len(s.completion_ids) for s in seqs)
    assert sum(mb.aux_weight for mb in micro) == pytest.approx(1.0)
    loads = [sum(mb.num_tokens for mb in rank) for rank in per_rank]
    assert max(loads) - min(loads) <= max(len(s) for s in seqs)
    for mb in micro:
        ids = mb.input_ids[0]
        # every target is the token right after its logit position, and positions restart per sequence
        assert torch.equal(ids[mb.target_pos + 1], mb.targets)
        starts = mb.cu_seqlens[:-1]
        assert (mb.position_ids[0, starts] == 0).all() and mb.cu_seqlens[-1] == mb.num_tokens
    with pytest.raises(ValueError, match="3 completion tokens but 2 rollout logprobs"):
        pack([Sequence([1, 2], [3, 4, 5], [-1.0, -1.0], 0.0, 1.0)], token_budget=8)


def test_oversized_sequence_gets_its_own_micro_batch():
    seqs = _sequences(4)
    micro = pack(seqs, token_budget=5)[0]
    assert len(micro) == 4 and all(mb.cu_seqlens.numel() == 2 for mb in micro)


@pytest.fixture(scope="module")
def trainer(policy):
    from sse_rl.workers.trainer import TrainerWorker

    path = policy
    # ddp: a plain module whose .grad tensors the tests read directly
    # the router aux loss is a product of batch means, not a sum over sequences: compare the policy loss alone
    worker = TrainerWorker(str(path), rank=0, world_size=1, train=TrainConfig(lr=1e-3, strategy="ddp"),
                           algo=AlgoConfig(aux_loss_coef=0.0),
                           temperature=1.0, seed=0, dtype="float32", gradient_checkpointing=False)
    worker.join("127.0.0.1", free_port())
    yield worker
    worker.close()


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()])


@pytest.fixture(scope="module")
def transformer_trainer(policy, tmp_path_factory):
    """A tiny random Qwen3 policy (what the 2B comparison bench trains) on the same tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from sse_rl.workers.trainer import TrainerWorker

    path = tmp_path_factory.mktemp("qwen3")
    config = Qwen3Config(vocab_size=19, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    Qwen3ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(policy).save_pretrained(path)
    worker = TrainerWorker(str(path), rank=0, world_size=1, train=TrainConfig(lr=1e-3), algo=AlgoConfig(),
                           temperature=1.0, seed=0, dtype="float32", gradient_checkpointing=False)
    return worker  # micro-steps only: no process group (the SSE-H trainer of this module holds it)


@pytest.fixture(scope="module")
def compiled_trainer(policy):
    """train.compile: every block under torch.compile (the SSE op a graph break), the loss head compiled, with
    gradient checkpointing recomputing every other compiled block (model.checkpoint_every=2)."""
    from sse_rl.workers.trainer import TrainerWorker

    return TrainerWorker(str(policy), rank=0, world_size=1, train=TrainConfig(lr=1e-3, strategy="ddp", compile=True),
                         algo=AlgoConfig(aux_loss_coef=0.0), temperature=1.0, seed=0, dtype="float32",
                         gradient_checkpointing=True, checkpoint_every=2)


@pytest.mark.parametrize("agg", ["dapo", "grpo", "dr_grpo"])
def test_packed_loss_equals_unpacked(trainer, agg):
    _check_packed_equals_unpacked(trainer, agg)


def test_transformer_policy_packed_loss_equals_unpacked(transformer_trainer):
    """A non-SSE-H policy packs through its own boundary handling (restarting position_ids), no cu_seqlens."""
    assert not transformer_trainer.fsdp  # fsdp2 with one rank trains unsharded
    _check_packed_equals_unpacked(transformer_trainer, "dapo")


@pytest.mark.slow
def test_compiled_trainer_packed_loss_equals_unpacked(compiled_trainer):
    """The compiled micro-step, half of its blocks recomputed, gives the eager per-sequence loss and gradients
    (three micro-batches of different lengths: dynamic shapes, no recompilation per length)."""
    layers = compiled_trainer.model.model.layers
    assert [block.gradient_checkpointing for block in layers] == [i % 2 == 0 for i in range(len(layers))]
    _check_packed_equals_unpacked(compiled_trainer, "dapo")
    assert all(block._compiled_call_impl is not None for block in compiled_trainer.model.model.layers)


@pytest.mark.slow
def test_compiled_trainer_probe_runs_eager(compiled_trainer):
    """The weight-sync probe (no gradients, unpacked prompts) runs the blocks eagerly: nothing new is compiled."""
    from torch._dynamo.utils import counters

    compiled_trainer._micro_step(*_one_micro_batch(compiled_trainer))  # the training graphs exist
    captured = counters["stats"]["calls_captured"]
    logp = compiled_trainer.first_token_logprobs([[1, 2, 3], [4, 5]], [[6, 7], [8]])
    assert counters["stats"]["calls_captured"] == captured
    model = compiled_trainer.model
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        expected = torch.log_softmax(model(input_ids=torch.tensor([[4, 5]]), use_cache=False).logits[0, -1], -1)
    assert logp[1] == pytest.approx([float(expected[8])], abs=1e-6)


def _one_micro_batch(trainer):
    from sse_rl.workers.trainer import _Extra

    (mb,) = pack(_sequences(2, seed=3), token_budget=64)[0]
    return mb.to(trainer.device), _Extra(None, None)


def _check_packed_equals_unpacked(trainer, agg: str) -> None:
    from sse_rl.workers.trainer import _Extra

    seqs = _sequences(9, seed=1)
    weights = build_loss_agg(agg, max_tokens=6)(torch.tensor([len(s.completion_ids) for s in seqs]))
    for s, w in zip(seqs, weights.tolist()):
        s.weight = w
    model = trainer.model
    # packed: three micro-batches through the varlen path
    model.zero_grad()
    micro = pack(seqs, token_budget=48)[0]
    assert len(micro) >= 2
    packed_loss = sum(trainer._micro_step(mb.to(trainer.device), _Extra(None, None)).loss.item() for mb in micro)
    packed_grads = _grads(model)
    # unpacked: each sequence alone through the ordinary forward, the loss written out directly
    model.zero_grad()
    unpacked_loss = 0.0
    for s in seqs:
        out = model(input_ids=torch.tensor([s.prompt_ids + s.completion_ids]), use_cache=False)
        n = len(s.prompt_ids)
        logp, _ = logprobs_and_entropy(out.logits[0, n - 1:n - 1 + len(s.completion_ids)],
                                       torch.tensor(s.completion_ids))
        ratio = torch.exp(logp - logp.detach())
        is_w = torch.exp(logp.detach() - torch.tensor(s.rollout_logprobs)).clamp(max=2.0)
        loss = (-ratio * s.advantage * is_w * s.weight).sum()
        loss.backward()
        unpacked_loss += float(loss.detach())
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(packed_grads, _grads(model), rtol=1e-4, atol=1e-6)
    assert _grads(model).abs().sum() > 0
    model.zero_grad()


def test_non_finite_step_is_skipped(trainer):
    seqs = _sequences(3, seed=4)
    for s in seqs:
        s.weight = 0.1
    seqs[1].advantage = float("nan")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train([pack(seqs, 64)[0]])
    assert stats.skipped == 1 and stats.updates == 1 and stats.grad_norm == float("inf")
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert all(p.grad is None for p in trainer.model.parameters())


def test_non_finite_weights_are_counted_after_the_update(trainer):
    """train.lr=inf: the gradient is finite, so the update is taken, and every weight it moves becomes non-finite;
    the step's statistics count them (the controller stops before syncing or saving them)."""
    seqs = _sequences(3, seed=5)
    for s in seqs:
        s.weight = 0.1
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optim = copy.deepcopy(trainer.optimizer.state_dict())
    for group in trainer.optimizer.param_groups:
        group["lr"] = float("inf")
    try:
        stats = trainer.train([pack(seqs, 64)[0]])
    finally:
        trainer.model.load_state_dict(weights)
        trainer.optimizer.load_state_dict(optim)  # the scheduler's step already set the lr back
    assert stats.skipped == 0 and math.isfinite(stats.grad_norm) and stats.nonfinite_weights > 0
    clean = trainer.train([[]])  # no micro-batch: no gradient, weights as restored
    assert clean.nonfinite_weights == 0


def _train_rank(rank: int, world: int, port: int, strategy: str, path: str, minibatches, queue, ckpt: str) -> None:
    """One trainer rank in its own process: one GRPO update, then every rank enters the weight gather (a collective
    under fsdp2) and rank 0 reports the full HF-named weights; every rank reports its stats.

    Two ranks also save a checkpoint, take another step and load it back: rank 0 reports how far the restored
    weights and optimizer state are from the saved ones."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from sse_rl.workers.trainer import FULL, TrainerWorker

    fsdp = strategy == "fsdp2"  # as recipes/sse_h_2b_grpo.yaml: sharded, checkpointed and compiled
    worker = TrainerWorker(path, rank=rank, world_size=world,
                           train=TrainConfig(lr=1e-3, strategy=strategy, compile=fsdp, token_budget=256),
                           algo=AlgoConfig(mini_batches=2, kl_coef=0.1), temperature=1.0, seed=0, dtype="float32",
                           gradient_checkpointing=fsdp)
    worker.join("127.0.0.1", port)
    stats = worker.train(minibatches)
    named = {k: v.numpy() for k, v in worker.engine_weights(gather_to_cpu=True).items()}  # by value, not shm
    restored = {}
    if world == 2:
        saved_optim = get_optimizer_state_dict(worker.model, worker.optimizer, options=FULL)
        saved_avg = {k: st["exp_avg"].clone() for k, st in saved_optim.get("state", {}).items()}  # ddp: live
        worker.save(ckpt)
        worker.train(minibatches)
        worker.load(ckpt)
        now = worker.engine_weights(gather_to_cpu=True)
        optim = get_optimizer_state_dict(worker.model, worker.optimizer, options=FULL)
        if rank == 0:
            restored["weights"] = max(float((now[k] - torch.from_numpy(v)).abs().max()) for k, v in named.items())
            restored["exp_avg"] = max(float((optim["state"][k]["exp_avg"] - avg).abs().max())
                                      for k, avg in saved_avg.items())
            restored["params"] = len(optim["state"])
    local_numel = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                      for p in worker.model.parameters())  # this rank's share of the parameters
    # by value: a tensor put on a multiprocessing queue as is (the stats' vectors) is shared through a file
    # descriptor this process must still hold when the parent reads it, and the rank exits right after
    queue.put(pickle.dumps((strategy, rank, world, stats, named, restored, local_numel)))
    worker.close()


@pytest.fixture(scope="module")
def distributed_runs(policy, tmp_path_factory):
    """One rank that sees everything (ddp) and two ranks with half of each mini-batch, for ddp and for fsdp2.

    Two mini-batches (pi_old computed up front, ratios != 1 in the second) and a k3 KL to the reference model, so the
    off-policy and KL paths are covered too; fsdp2 ranks also use gradient checkpointing and train.compile."""
    import torch.multiprocessing as mp

    seqs = _sequences(16, seed=2)
    for s in seqs:
        s.weight = 1.0 / 8 / len(s.completion_ids)  # grpo-style weights of two mini-batches of 8
    minis = [seqs[:8], seqs[8:]]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    # mini-batch 1 gives the ranks different numbers of micro-batches; mini-batch 2 fits one micro-batch, so rank 1
    # has nothing to do there and still joins the all-reduce (ddp) / the all-gathers and reduce-scatters (fsdp2)
    two = [pack(minis[0], 24, 2), pack(minis[1], 4096, 2)]
    assert two[1][1] == [] and len(two[0][0]) != len(two[0][1])
    # the single rank runs the same micro-batches (the router aux loss depends on how tokens are grouped)
    jobs = [(0, 1, free_port(), "ddp", [two[j][0] + two[j][1] for j in range(2)])]
    for strategy in ("ddp", "fsdp2"):
        port = free_port()
        jobs += [(r, 2, port, strategy, [two[j][r] for j in range(2)]) for r in range(2)]
    ckpt = {strategy: str(tmp_path_factory.mktemp(f"ckpt_{strategy}")) for strategy in ("ddp", "fsdp2")}
    procs = [ctx.Process(target=_train_rank, args=(*job[:4], policy, job[4], queue, ckpt[job[3]])) for job in jobs]
    return run_ranks(procs, queue)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.slow
def test_two_gloo_ranks_match_one(distributed_runs, policy, strategy):
    """Two ranks with half of each mini-batch each end with the weights of one rank that saw everything, and rank 0's
    weights for the engines are the full HF-named tensors (the names and shapes of the checkpoint)."""
    from safetensors.torch import load_file

    single = next(r for r in distributed_runs if r[2] == 1)
    double = sorted((r for r in distributed_runs if r[2] == 2 and r[0] == strategy), key=lambda r: r[1])
    one, merged = single[3], StepStats.merge([r[3] for r in double])  # the controller's merge over ranks
    assert one.updates == 2 and one.skipped == 0 and one.kl_sum > 0
    assert merged.updates == 2 and merged.skipped == 0 and merged.tokens == one.tokens
    assert merged.loss == pytest.approx(one.loss, rel=1e-5) and merged.kl_sum == pytest.approx(one.kl_sum, rel=1e-5)
    assert merged.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    assert merged.is_max == max(r[3].is_max for r in double) and merged.is_min == min(r[3].is_min for r in double)
    dist_weights = next(r[4] for r in double if r[1] == 0)
    total = single[6]
    # fsdp2 ranks hold disjoint shards of the parameters (and so of the gradients and Adam state); ddp full copies
    local = [r[6] for r in double]
    if strategy == "ddp":
        assert local == [total, total]
    else:  # dim-0 chunks: about half each, summing to the whole
        assert sum(local) == total and max(local) < 0.51 * total, (local, total)
    assert next(r[4] for r in double if r[1] == 1) == {}
    initial = load_file(next(__import__("pathlib").Path(policy).glob("*.safetensors")))
    assert {k: v.shape for k, v in dist_weights.items()} == {k: tuple(v.shape) for k, v in initial.items()}
    moved = 0.0
    for name, value in single[4].items():
        got, want = torch.from_numpy(dist_weights[name]), torch.from_numpy(value)
        off = (got - want).abs() > 1e-6 + 1e-5 * want.abs()
        if strategy == "ddp":
            # eager, like the single rank: only the all-reduce sums the gradient in another order, and where a
            # gradient is ~0 Adam's m / sqrt(v) lifts that 1e-9 to ~1e-6 (seen: 1 element of 65,536 at 1.2e-6)
            assert float(off.float().mean()) < 1e-4 and float((got - want).abs().max()) < 1e-5, name
        else:
            # compiled: Inductor's fused fp32 reductions round differently, and where a gradient is ~0 Adam's
            # m / sqrt(v) turns a 1e-9 difference into one of the update's size (~1e-3): a rare element may differ
            assert float(off.float().mean()) < 1e-3 and float((got - want).abs().max()) < 1e-3, name
        moved = max(moved, float((want - initial[name]).abs().max()))
    assert moved > 1e-4  # the step changed the weights
    # save -> another step -> load gives back the saved weights and the full (unsharded) optimizer state
    restored = next(r[5] for r in double if r[1] == 0)
    assert restored["params"] == len(initial) and restored["weights"] == 0.0 and restored["exp_avg"] == 0.0


def test_synced_weights_carry_the_checkpoints_names_with_tied_embeddings(tmp_path):
    """A policy whose LM head is tied to the embeddings (a hybridized Qwen3, say) syncs exactly the names its
    checkpoint holds: engines validate updates against those, and the tied head is stored once."""
    from safetensors import safe_open

    from sse_rl.init_model import init_model
    from sse_rl.tasks.max_digit import build_tokenizer
    from sse_rl.workers.trainer import TrainerWorker

    init_model("sse-h-tiny", tmp_path, tokenizer=build_tokenizer(tmp_path), seed=0, tie_word_embeddings=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        checkpoint = set(f.keys())
    worker = TrainerWorker(str(tmp_path), rank=0, world_size=1, train=TrainConfig(lr=1e-3, strategy="ddp"),
                           algo=AlgoConfig(), temperature=1.0, seed=0, dtype="float32", gradient_checkpointing=False)
    assert "lm_head.weight" not in checkpoint
    assert set(worker.engine_weights(gather_to_cpu=False)) == checkpoint
    assert set(worker.engine_weight_shapes()) == checkpoint
