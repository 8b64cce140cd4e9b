"""Placement groups of the run's actors (`sse_rl.actors.packed_group`), on a real local Ray cluster."""
from __future__ import annotations

import pytest
import ray

from sse_rl.actors import packed_group

pytestmark = pytest.mark.slow  # starts Ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=1)
class Rank:
    def group(self) -> str | None:
        return ray.get_runtime_context().get_placement_group_id()


def test_ranks_run_in_one_packed_group_that_holds_them_all(cluster):
    from ray.util import placement_group_table

    options = packed_group({"CPU": 1, "GPU": 0}, 2, "trainer ranks")
    group = options[0]["scheduling_strategy"].placement_group
    assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [0, 1]
    table = placement_group_table(group)
    assert table["strategy"] == "PACK" and table["state"] == "CREATED" and list(table["bundles"].values()) == [
        {"CPU": 1.0}, {"CPU": 1.0}]  # the GPU: 0 entry is dropped (Ray rejects zero-sized bundle resources)
    ranks = [Rank.options(**options[r]).remote() for r in range(2)]
    assert ray.get([r.group.remote() for r in ranks]) == [group.id.hex()] * 2


def test_a_group_the_cluster_cannot_hold_names_the_shortfall(cluster):
    with pytest.raises(RuntimeError, match=r"trainer ranks: .* cannot hold 2 x \{'GPU': 1.*GPU: 2 needed, 0"):
        packed_group({"GPU": 1, "CPU": 1}, 2, "trainer ranks")
    with pytest.raises(RuntimeError, match="CPU: 8 needed, 3 in the cluster"):
        packed_group({"CPU": 4}, 2, "engine + trainer pairs")
