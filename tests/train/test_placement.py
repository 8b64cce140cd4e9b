"""Placement groups of the run's actors (`sse_rl.actors.reserve`), on a real local Ray cluster: every actor kind is
reserved through one bounded wait, so resources the cluster has but something else holds are an error that names
what was not placed (#26), never a hang."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray

from sse_rl import actors
from sse_rl.actors import REWARD, ClusterTooSmall, Request, requests, reserve
from sse_rl.config import Recipe, parse_recipe, validate

pytestmark = pytest.mark.slow  # starts Ray
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=1)
class Rank:
    def group(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()


@ray.remote
class Hog:
    """Another job's actor: holds the CPUs it was created with for as long as it lives."""

    def ready(self) -> bool:
        return True


@pytest.fixture
def hog(cluster):
    """Start a Hog holding `cpus` CPUs; killed after the test."""
    held = []

    def start(cpus: int) -> None:
        held.append(Hog.options(num_cpus=cpus).remote())
        ray.get(held[-1].ready.remote())

    yield start
    for actor in held:
        ray.kill(actor)


def _tiny() -> Recipe:
    return validate(*parse_recipe(str(ROOT / "recipes/tiny_cpu.yaml"), ["out_dir=unused"], Recipe))


def _free_cpus(expected: float, wait_s: float = 10.0) -> float:
    """The cluster's free CPUs once they reach `expected` (removal and kills free resources asynchronously)."""
    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


def test_ranks_run_in_one_packed_group_that_holds_them_all(cluster):
    from ray.util import placement_group_table

    options = reserve([Request("trainer ranks", 2, {"CPU": 1, "GPU": 0})])["trainer ranks"]
    group = options[0]["scheduling_strategy"].placement_group
    assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [0, 1]
    table = placement_group_table(group)
    assert table["strategy"] == "PACK" and table["state"] == "CREATED" and list(table["bundles"].values()) == [
        {"CPU": 1.0}, {"CPU": 1.0}]  # the GPU: 0 entry is dropped (Ray rejects zero-sized bundle resources)
    ranks = [Rank.options(**options[r]).remote() for r in range(2)]
    assert ray.get([r.group.remote() for r in ranks]) == [group.id.hex()] * 2
    for rank in ranks:
        ray.kill(rank)
    ray.util.remove_placement_group(group)


def test_every_actor_kind_of_the_run_gets_a_group_of_its_own(cluster):
    placed = reserve(requests(_tiny(), colocated=False))
    assert {what: len(options) for what, options in placed.items()} == {
        "rollout engines": 1, "trainer ranks": 1, "reward worker": 1}
    groups = {what: options[0]["scheduling_strategy"].placement_group for what, options in placed.items()}
    assert len({g.id for g in groups.values()}) == 3
    assert _free_cpus(0.0) == 0.0  # the run's 3 CPUs are reserved before any actor starts
    for group in groups.values():
        ray.util.remove_placement_group(group)


def test_a_group_the_cluster_cannot_hold_names_the_shortfall(cluster):
    with pytest.raises(ClusterTooSmall, match=r"GPU: 2 needed, 0 in the cluster\n    trainer ranks: 2 x 1 GPU"):
        reserve([Request("trainer ranks", 2, {"GPU": 1, "CPU": 1})])
    with pytest.raises(ClusterTooSmall, match="CPU: 8 needed, 3 in the cluster"):
        reserve([Request("engine + trainer pairs", 2, {"CPU": 4})])


def test_cpus_held_by_another_actor_stop_the_reward_worker_within_the_timeout(cluster, hog, monkeypatch):
    monkeypatch.setattr(actors, "READY_TIMEOUT_S", 1.0)
    hog(3)  # the cluster's totals hold the reward worker, but its CPU is taken
    t0 = time.monotonic()
    with pytest.raises(ClusterTooSmall) as err:
        reserve([Request(REWARD, 1, {"CPU": 1})])
    assert time.monotonic() - t0 < 5, "an unplaceable group must fail at READY_TIMEOUT_S, not wait"
    message = str(err.value)
    assert "not placed within 1 s" in message and "reward worker: 1 x {'CPU': 1}" in message, message
    assert "free when asked: CPU 0" in message, message


def test_only_the_groups_not_placed_are_named_and_none_is_left_holding_resources(cluster, hog, monkeypatch):
    monkeypatch.setattr(actors, "READY_TIMEOUT_S", 1.0)
    hog(2)  # one CPU free: the engines' group, the trainers' group and the reward's group need one each
    with pytest.raises(ClusterTooSmall) as err:
        reserve(requests(_tiny(), colocated=False))
    message = str(err.value)
    named = [what for what in ("rollout engines", "trainer ranks", "reward worker") if f"\n  {what}: 1 x" in message]
    assert len(named) == 2, message  # one of the three got the free CPU, the other two are named
    assert "free when asked: CPU 1" in message, message
    assert _free_cpus(1.0) == 1.0  # the placed group was removed with the others: nothing started in it
