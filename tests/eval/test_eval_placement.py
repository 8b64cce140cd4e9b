"""Data-parallel eval engines reserve their resources with a bounded wait: a cluster that cannot hold them stops the
eval with the shortfall named (issue 26: start-up never hangs). No engine starts here: placement fails first."""
import time

import pytest
import ray

from sse_rl.eval import engines
from sse_rl.eval.engines import EngineSpec, start_actors

pytestmark = pytest.mark.slow  # starts a local Ray cluster


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_more_engines_than_the_cluster_holds_are_refused_at_once(cluster):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"3 eval engines .* CPU 3 needed, 2 in the cluster"):
        start_actors(EngineSpec(model="unused"), count=3, gpus_per_engine=0)
    assert time.monotonic() - start < 5


@ray.remote(num_cpus=2)
class Holder:
    def ready(self) -> bool:
        return True


def test_engines_whose_cpus_are_held_stop_within_the_timeout(cluster, monkeypatch):
    holder = Holder.remote()
    ray.get(holder.ready.remote())
    monkeypatch.setattr(engines, "PLACE_TIMEOUT_S", 1.0)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"2 eval engines .* not placed within 1 s"):
        start_actors(EngineSpec(model="unused"), count=2, gpus_per_engine=0)
    assert time.monotonic() - start < 10
    ray.kill(holder)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2  # the group was removed, nothing is left holding CPUs
