"""train.offload_optimizer on the real TrainerWorker (CPU, gloo): the AdamW state leaves the device between train
phases and comes back intact, so training, checkpoints and resuming are exactly those of a run without it."""
from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch

from sse_rl.config import AlgoConfig, TrainConfig
from sse_rl.packing import MicroBatch, Sequence, pack
from trainer_ranks import free_port, run_ranks

PROBE = ([[1, 2, 3], [4, 5]], [[6, 7], [8]])  # the weight-sync probe's prompts and tokens


def _phase(seed: int, ranks: int = 1) -> list[list[list[MicroBatch]]]:
    """One step's work, two mini-batches (two optimizer steps) of four sequences each, per rank."""
    rng = random.Random(seed)
    minis = []
    for _ in range(2):
        seqs = []
        for _ in range(4):
            completion = [rng.randrange(1, 19) for _ in range(rng.randint(2, 6))]
            seqs.append(Sequence([rng.randrange(2, 19) for _ in range(rng.randint(3, 9))], completion,
                                 [-rng.uniform(1.5, 4.0) for _ in completion], advantage=rng.uniform(-1, 1),
                                 weight=1.0 / 4 / len(completion)))
        minis.append(pack(seqs, token_budget=32, num_ranks=ranks))
    return [[mini[r] for mini in minis] for r in range(ranks)]


def _worker(policy: str, offload: bool, rank: int = 0, world: int = 1, port: int | None = None):
    """A joined trainer rank (the only process group of its process while it lives: `close` it before the next)."""
    from sse_rl.workers.trainer import TrainerWorker

    worker = TrainerWorker(policy, rank=rank, world_size=world,
                           train=TrainConfig(lr=1e-2, weight_decay=0.01, offload_optimizer=offload),
                           algo=AlgoConfig(mini_batches=2), temperature=1.0, seed=0, dtype="float32",
                           gradient_checkpointing=False)
    worker.join("127.0.0.1", port or free_port())
    return worker


def _state_bytes(worker) -> list[int]:
    """Storage bytes of each tensor of the optimizer state (the local shards of DTensors)."""
    return [(v.to_local() if hasattr(v, "to_local") else v).untyped_storage().nbytes()
            for state in worker.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, trainer state: optimizer, scheduler) of a checkpoint directory."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted((Path(path) / "model").glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    trainer = torch.load(Path(path) / "trainer.pt", weights_only=False)
    return weights, {"optimizer": trainer["optimizer"], "scheduler": trainer["scheduler"]}


def _assert_equal(a, b, where: str = "") -> None:
    """Exact equality of nested dicts / lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _same_checkpoints(a: str, b: str) -> None:
    (wa, ta), (wb, tb) = _checkpoint(a), _checkpoint(b)
    _assert_equal(wa, wb, "weights")
    _assert_equal(ta, tb, "trainer")
    assert ta["optimizer"]["state"], "the checkpoint holds an optimizer state"


@pytest.fixture(scope="module")
def runs(policy, tmp_path_factory):
    """Three phases without offload (a checkpoint after each), the same with offload (checkpoints after phases 1 and
    3, then phase 2 again from phase 1's checkpoint), and a fresh offloading worker resuming from phase 1."""
    ckpt = {name: str(tmp_path_factory.mktemp(name)) for name in
            ("plain_1", "plain_2", "plain_3", "off_1", "off_3", "off_resumed_2", "fresh_resumed_2")}
    phases = [_phase(seed)[0] for seed in range(3)]
    out: dict = {"plain": [], "off": [], "bytes": []}
    worker = _worker(policy, offload=False)
    for i, phase in enumerate(phases, 1):
        out["plain"].append(worker.train(phase))
        out.setdefault("plain_probe", worker.first_token_logprobs(*PROBE))
        worker.save(ckpt[f"plain_{i}"])
    worker.close()

    worker = _worker(policy, offload=True)
    out["bytes_before"] = _state_bytes(worker)  # nothing yet: AdamW creates its state in its first step
    for i, phase in enumerate(phases, 1):
        out["off"].append(worker.train(phase))
        out["bytes"].append(_state_bytes(worker))
        out.setdefault("off_probe", worker.first_token_logprobs(*PROBE))
        if i in (1, 3):
            worker.save(ckpt[f"off_{i}"])
            out[f"bytes_saved_{i}"] = _state_bytes(worker)
    worker.load(ckpt["off_1"])  # into an optimizer whose state is on the host
    out["bytes_loaded"] = _state_bytes(worker)
    out["resumed"] = worker.train(phases[1])
    worker.save(ckpt["off_resumed_2"])
    worker.close()

    worker = _worker(policy, offload=True)
    worker.load(ckpt["off_1"])  # into an optimizer that has no state yet
    out["bytes_fresh_loaded"] = _state_bytes(worker)
    worker.train(phases[1])
    worker.save(ckpt["fresh_resumed_2"])
    worker.close()
    return out, ckpt


def test_offload_trains_exactly_as_without(runs):
    """Same weights, optimizer state and scheduler after each phase, bit for bit, and the same step statistics."""
    out, ckpt = runs
    _same_checkpoints(ckpt["plain_1"], ckpt["off_1"])
    _same_checkpoints(ckpt["plain_3"], ckpt["off_3"])
    for plain, off in zip(out["plain"], out["off"]):
        assert (plain.loss, plain.grad_norm, plain.updates) == (off.loss, off.grad_norm, off.updates)
    assert out["plain_probe"] == out["off_probe"]  # the weight-sync probe runs with the state on the host


def test_state_holds_no_storage_between_phases(runs, policy):
    """After every phase, and after a save, each state tensor's storage is empty; the step reports what moved."""
    from safetensors.torch import load_file

    out, _ = runs
    assert out["bytes_before"] == []
    weights = load_file(str(next(Path(policy).glob("*.safetensors"))))
    numel, params = sum(t.numel() for t in weights.values()), len(weights)
    for moved in out["bytes"]:
        assert len(moved) == 3 * params and set(moved) == {0}  # step, exp_avg, exp_avg_sq of every parameter
    assert set(out["bytes_saved_1"]) == set(out["bytes_saved_3"]) == {0}
    gib = (2 * numel + params) * 4 / 2**30  # two fp32 moments per weight, one fp32 step count per parameter
    for i, stats in enumerate(out["off"]):
        assert stats.offload_gib == pytest.approx(gib) and stats.time_offload > 0
        # the first phase has nothing to copy back: AdamW creates the state in it
        assert stats.time_reload == 0 if i == 0 else stats.time_reload > 0
        metrics = stats.to_metrics()
        assert metrics["train/offload_gib"] == stats.offload_gib
        assert metrics["time/train_offload"] == stats.time_offload
        assert metrics["time/train_reload"] == stats.time_reload
    assert not {"train/offload_gib", "time/train_offload"} & out["plain"][0].to_metrics().keys()


def test_resume_while_offloaded(runs):
    """A checkpoint saved while the state was on the host, loaded into an offloaded optimizer or into a new worker
    whose optimizer has no state yet, leaves the state on the host and gives the next step of a run without
    offload."""
    out, ckpt = runs
    assert out["bytes_loaded"] and set(out["bytes_loaded"]) == {0}
    assert out["bytes_fresh_loaded"] and set(out["bytes_fresh_loaded"]) == {0}
    assert out["resumed"].loss == out["plain"][1].loss
    _same_checkpoints(ckpt["plain_2"], ckpt["off_resumed_2"])
    _same_checkpoints(ckpt["plain_2"], ckpt["fresh_resumed_2"])


def _fsdp2_rank(rank: int, ports: list[int], policy: str, ckpt: dict[str, str], queue) -> None:
    """One of two fsdp2 ranks in its own process: two phases without offload, then with it (a checkpoint after each
    phase), then phase 2 again from the offloaded run's phase-1 checkpoint; reports its state's storage bytes."""
    from torch.distributed.tensor import DTensor

    phases = [_phase(seed, ranks=2)[rank] for seed in range(2)]
    worker = _worker(policy, offload=False, rank=rank, world=2, port=ports[0])
    for i, phase in enumerate(phases, 1):
        worker.train(phase)
        worker.save(ckpt[f"plain_{i}"])
    worker.close()
    worker = _worker(policy, offload=True, rank=rank, world=2, port=ports[1])
    moved = []
    for i, phase in enumerate(phases, 1):
        worker.train(phase)
        moved.append(_state_bytes(worker))
        worker.save(ckpt[f"off_{i}"])
    worker.load(ckpt["off_1"])
    moved.append(_state_bytes(worker))
    worker.train(phases[1])
    worker.save(ckpt["off_resumed_2"])
    sharded = all(isinstance(state["exp_avg"], DTensor) for state in worker.optimizer.state.values())
    worker.close()
    queue.put(pickle.dumps((rank, moved, sharded)))


@pytest.mark.slow
def test_fsdp2_two_gloo_ranks(policy, tmp_path_factory):
    """fsdp2 on two gloo ranks (~45 s: two spawned processes): the state is DTensor shards, each rank's local shards
    leave the device, and the checkpoints (gathered full state) of the offloaded run and of its resumption equal
    those without offload. A loaded shard need not own its storage (rank 1's uneven shard of the embeddings' moments
    sits in padded storage): it moves as a copy."""
    import torch.multiprocessing as mp

    ckpt = {name: str(tmp_path_factory.mktemp(f"fsdp2_{name}"))
            for name in ("plain_1", "plain_2", "off_1", "off_2", "off_resumed_2")}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports = [free_port(), free_port()]
    procs = [ctx.Process(target=_fsdp2_rank, args=(rank, ports, policy, ckpt, queue)) for rank in range(2)]
    results = run_ranks(procs, queue)
    for _, moved, sharded in results:
        assert sharded and all(m and set(m) == {0} for m in moved), moved
    for name in ("1", "2"):
        _same_checkpoints(ckpt[f"plain_{name}"], ckpt[f"off_{name}"])
    _same_checkpoints(ckpt["plain_2"], ckpt["off_resumed_2"])
