"""Start-up on a cluster too small for the run (#26): what the actors ask for (`sse_rl.actors.requests`) against the
cluster's totals is an error within seconds that names the shortfall, never a hang."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from sse_rl.actors import check_cluster, requests, shortfall
from sse_rl.config import Recipe, parse_recipe, validate

ROOT = Path(__file__).resolve().parents[2]


def _recipe(*overrides: str) -> Recipe:
    return validate(*parse_recipe(str(ROOT / "recipes/tiny_cpu.yaml"), ["out_dir=unused", *overrides], Recipe))


def test_requests_add_up_what_the_actors_are_created_with():
    needed = requests(_recipe("rollout.num_engines=2", "train.num_trainers=3"), colocated=False)
    assert [(q.what, q.count, q.bundle) for q in needed] == [
        ("rollout engines", 2, {"CPU": 1, "GPU": 0.0}), ("trainer ranks", 3, {"CPU": 1, "GPU": 0.0}),
        ("reward worker", 1, {"CPU": 1})]
    pairs = requests(_recipe("train.num_trainers=2"), colocated=True)
    assert [(q.what, q.count, q.bundle) for q in pairs][0] == ("engine + trainer pairs (colocated)", 2,
                                                               {"GPU": 1, "CPU": 2})


def test_a_cluster_that_holds_the_actors_is_no_error():
    assert shortfall(requests(_recipe(), colocated=False), {"CPU": 3.0}) is None


def test_the_shortfall_names_each_resource_each_actor_kind_and_the_keys_to_change():
    needed = requests(_recipe("rollout.num_gpus_per_engine=0.5", "train.num_gpus_per_trainer=1",
                              "train.num_trainers=2"), colocated=False)
    message = shortfall(needed, {"CPU": 2.0})
    assert message is not None
    assert "CPU: 4 needed, 2 in the cluster" in message
    assert "rollout engines: 1 x 1 CPU" in message and "trainer ranks: 2 x 1 CPU" in message
    assert "reward worker: 1 x 1 CPU" in message and "raise run.ray_num_cpus" in message
    assert "GPU: 2.5 needed, 0 in the cluster" in message
    assert "rollout engines: 1 x 0.5 GPU" in message and "trainer ranks: 2 x 1 GPU" in message
    assert "reward worker: 1 x 0" not in message  # kinds that ask none of a resource are left out
    assert "train.num_gpus_per_trainer" in message and "rollout.num_gpus_per_engine" in message


def test_check_cluster_reads_the_cluster_totals(monkeypatch):
    import ray

    from sse_rl.actors import ClusterTooSmall

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ClusterTooSmall, match="CPU: 3 needed, 2 in the cluster"):
        check_cluster(requests(_recipe(), colocated=False))


@pytest.mark.slow  # starts Ray
def test_train_on_too_few_cpus_exits_1_naming_the_shortfall(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sse_rl.train", "recipes/tiny_cpu.yaml", f"out_dir={tmp_path / 'run'}",
                           "run.ray_num_cpus=2", "run.progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "the Ray cluster cannot hold this run's actors" in log and "CPU: 3 needed, 2 in the cluster" in log, \
        log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert time.monotonic() - t0 < 90, "start-up on too few CPUs took too long"
