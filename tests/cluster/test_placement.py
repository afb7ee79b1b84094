"""Where the launch puts trainer ranks and engines: one STRICT_PACK placement group per node, ranks numbered
node by node, every tensor-parallel group inside one node; and the wait for the nodes."""

from __future__ import annotations

import pytest
from ray.util.placement_group import placement_group_table

from megatron_rl.cluster.config import ClusterConfig
from megatron_rl.cluster.launch import _place, node_layout
from megatron_rl.cluster.nodes import wait_for_nodes


def test_ranks_fill_nodes_in_order_and_engines_come_last() -> None:
    # the 7B recipe with separate engines: 3 nodes x 4 GPUs, 8 trainer ranks (TP=2 x DP=4), 4 engines
    assert node_layout(8, 4, 4, tp=2) == [["trainer"] * 4, ["trainer"] * 4, ["engine"] * 4]
    # a partial last node
    assert node_layout(6, 3, 4, tp=2) == [["trainer"] * 4, ["trainer", "trainer", "engine", "engine"], ["engine"]]
    assert node_layout(2, 1, 8, tp=2) == [["trainer", "trainer", "engine"]]


@pytest.mark.parametrize(("num_trainers", "per_node", "tp"), [(8, 4, 8), (6, 3, 2), (12, 6, 4)])
def test_a_tensor_parallel_group_across_two_nodes_is_refused(num_trainers: int, per_node: int, tp: int) -> None:
    with pytest.raises(ValueError, match=rf"parallel.tp={tp} with {per_node} ranks per node .* on two nodes"):
        node_layout(num_trainers, 0, per_node, tp=tp)


def test_every_tensor_parallel_group_lies_in_one_node_when_accepted() -> None:
    for per_node in range(1, 9):
        for tp in (1, 2, 4, 8):
            for num_trainers in range(tp, 33, tp):
                try:
                    layout = node_layout(num_trainers, 0, per_node, tp=tp)
                except ValueError:
                    continue
                node_of = [node for node, kinds in enumerate(layout) for _ in kinds]
                for first in range(0, num_trainers, tp):
                    assert len(set(node_of[first : first + tp])) == 1, (per_node, tp, num_trainers)


def test_each_node_gets_its_own_strict_pack_group(local_ray) -> None:
    cluster = ClusterConfig(cpus_per_trainer=0.5, engine_cpus=0.5, setup_timeout_s=60)
    placement = _place(cluster, node_layout(4, 2, 3, tp=1), gpus=False)
    try:
        assert len(placement.groups) == 2
        tables = [placement_group_table(group) for group in placement.groups]
        assert [table["strategy"] for table in tables] == ["STRICT_PACK", "STRICT_PACK"]
        assert [len(table["bundles"]) for table in tables] == [3, 3]
        first, second = placement.groups
        assert placement.trainers == [(first, 0), (first, 1), (first, 2), (second, 0)]
        assert placement.engines == [(second, 1), (second, 2)]
    finally:
        placement.remove()


def test_waiting_for_missing_nodes_times_out_naming_them(local_ray) -> None:
    with pytest.raises(TimeoutError, match=r"after 1s the Ray cluster has 1 nodes and 0 GPUs .*"
                                           r"expected 2 nodes and 0 GPUs"):
        wait_for_nodes(2, 0, 1.0, poll_s=0.2)
    assert wait_for_nodes(1, 0, 5.0)["CPU"] == 4.0
