"""What a run exposes and leaves behind (issue #26): rendezvous stores listen on one address and keep their keys
under the run's secret; weight-update staging folders do not outlive the update or the engine that made them.

Each test injects the fault (a peer on another interface or without the secret, a process killed mid-update, an
update that fails) in real processes and checks the outcome.
"""
from __future__ import annotations

import os
import signal
import socket
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sse_rl import rendezvous
from sse_rl.weight_sync import flat
from sse_rl.workers import rollout

LOOPBACK = rendezvous.LOOPBACK


def _listening(port: int) -> set[str]:
    """The addresses this process listens on at `port`."""
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def _other_local_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_the_meeting_host_is_loopback_on_one_node_only():
    assert rendezvous.meeting_host(1, "10.0.0.7") == LOOPBACK
    assert rendezvous.meeting_host(3, "10.0.0.7") == "10.0.0.7"
    assert rendezvous.new_secret() != rendezvous.new_secret() and len(rendezvous.new_secret()) == 32


def test_the_store_listens_on_its_address_alone():
    port = rendezvous.free_port(LOOPBACK)
    store = rendezvous.open_store(LOOPBACK, port, 0, 1, rendezvous.new_secret())
    assert _listening(port) == {LOOPBACK}, "torch's own server listens on every interface"
    other = _other_local_address()
    if other is None:
        pytest.skip("no non-loopback address to connect from")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other, port), timeout=5).close()
    del store


def test_keys_are_out_of_reach_without_the_secret():
    """A client that reaches the port without the secret (or with another run's) neither finds a rank's key nor
    overwrites it."""
    secret, port = rendezvous.new_secret(), rendezvous.free_port(LOOPBACK)
    # world size 1: the master does not wait for the clients below, which are not ranks
    master = rendezvous.open_store(LOOPBACK, port, 0, 1, secret, timeout=timedelta(seconds=5))
    raw = dist.TCPStore(LOOPBACK, port, is_master=False, timeout=timedelta(seconds=1))
    peer = rendezvous.open_store(LOOPBACK, port, 1, 2, secret, timeout=timedelta(seconds=5))
    master.set("nccl_id", b"the rank's value")
    stranger = dist.PrefixStore(rendezvous.new_secret(), raw)
    assert not raw.check(["nccl_id"]) and not stranger.check(["nccl_id"])
    with pytest.raises(dist.DistStoreError):
        raw.get("nccl_id")  # waits for a key it will never see
    stranger.set("nccl_id", b"forged")
    raw.set("nccl_id", b"forged")
    assert peer.get("nccl_id") == b"the rank's value"


def _rank(rank: int, ports: tuple[int, int], secret: str, queue) -> None:
    """One rank of both groups a trainer rank 0 hosts: the trainers' default group (through `init_process_group`,
    as `TrainerWorker.join`) and the weight-sync group (`flat.join_group`)."""
    default_port, sync_port = ports
    store = rendezvous.open_store(LOOPBACK, default_port, rank, 2, secret)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    group = flat.join_group(LOOPBACK, sync_port, rank, 2, torch.device("cpu"), secret)
    weights = torch.arange(4.0) if rank == 0 else torch.zeros(4)
    group.broadcast(weights, 0).wait()
    listening = [sorted(_listening(p)) for p in ports] if rank == 0 else None
    queue.put((rank, float(total), weights.tolist(), listening))
    dist.barrier()
    dist.destroy_process_group()


def test_groups_built_through_the_helper_still_work():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ports, secret = (rendezvous.free_port(LOOPBACK), rendezvous.free_port(LOOPBACK)), rendezvous.new_secret()
    procs = [ctx.Process(target=_rank, args=(r, ports, secret, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [r[1] for r in results] == [3.0, 3.0]  # all_reduce of 1 + 2
    assert [r[2] for r in results] == [[0.0, 1.0, 2.0, 3.0]] * 2  # rank 0's weights reached rank 1
    assert results[0][3] == [[LOOPBACK], [LOOPBACK]]  # both stores, loopback only


def _stage_and_hang(parent: str, queue) -> None:
    """An engine in the middle of an update: its staging folder holds a weights file when it is killed."""
    with rollout.staging_dir(Path(parent)) as folder:
        (folder / "weights.safetensors").write_bytes(b"\0" * 1024)
        queue.put(str(folder))
        signal.pause()


def test_a_killed_engines_staging_is_removed_at_the_next_worker_start(tmp_path, monkeypatch):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_stage_and_hang, args=(str(tmp_path), queue))
    child.start()
    staged = Path(queue.get(timeout=60))
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert staged.is_dir() and (staged / "weights.safetensors").exists(), "SIGKILL runs no clean-up"
    with rollout.staging_dir(tmp_path) as live:  # this process's own update, still running: kept
        monkeypatch.setattr(rollout, "STAGING_PARENT", tmp_path)
        monkeypatch.setattr(rollout.Engine, "__init__", lambda self, *args, **kwargs: None)  # no vLLM engine
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        rollout.RolloutWorker(spec=None)
        assert not staged.exists() and live.is_dir()
    assert list(tmp_path.iterdir()) == []


class FailingLLM:
    """An engine whose workers fail to load the update (after it was staged)."""

    def collective_rpc(self, method: str, args: tuple) -> list:
        assert Path(args[0]).is_file(), "the update is staged before the workers are called"
        raise RuntimeError("engine core died")


def test_a_failed_update_leaves_no_staging(tmp_path, monkeypatch):
    monkeypatch.setattr(rollout, "STAGING_PARENT", tmp_path)
    worker = rollout.RolloutWorker.__new__(rollout.RolloutWorker)
    worker.llm = FailingLLM()
    with pytest.raises(RuntimeError, match="engine core died"):
        worker.load_weights({"w": torch.ones(3)})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # starts Ray
def test_a_run_that_ends_removes_what_killed_engines_staged_on_its_node(tmp_path, monkeypatch):
    """The driver sweeps after ray.shutdown, whatever ended the run (here: a cluster too small for the actors)."""
    import subprocess
    import sys

    from sse_rl.train import main

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{rollout.STAGING_PREFIX}{dead.pid}-x"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"0" * 1024)
    monkeypatch.setattr(rollout, "STAGING_PARENT", tmp_path)
    root = Path(__file__).resolve().parents[2]
    assert main([str(root / "recipes/tiny_cpu.yaml"), f"out_dir={tmp_path / 'run'}", "run.ray_num_cpus=2",
                 "run.progress=false"]) == 1
    assert not stale.exists()
