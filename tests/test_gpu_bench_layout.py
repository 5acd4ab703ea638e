"""The GPU benchmark's layouts: every replica fits a GPU node, one replica of a pool per node that hosts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.gpu_bench import LAYOUTS, layout, parse_levels


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_places_each_replica_on_its_own_gpu_node(name, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg, nodes = layout(name, 16, Path("models/bench"))
    assert cfg.router.steps.token_budget == 16 * cfg.router.steps.step_max_tokens
    for node in nodes:
        assert len(node.gpus) == 1
        hosted = [pool for role, pool in cfg.pools.items() if node.resources.get(f"{role}_pool")]
        assert sum(p.placement.num_gpus for p in hosted) <= 1  # the pools it hosts share its one GPU
    for role, pool in cfg.pools.items():
        hosts = sum(node.resources.get(pool.placement.node_resource, 0) for node in nodes)
        assert pool.placement.node_resource_units == 1
        if pool.autoscaling.min_replicas > 0:  # large-only leaves the small pool at zero replicas, hosted nowhere
            assert pool.autoscaling.max_replicas <= hosts, f"{role}: more replicas than nodes to hold them"
    assert [n.gpus[0] for n in nodes] == ["0", "1"][:len(nodes)]


def test_levels_parse_and_reject_unknown_arms():
    assert parse_levels("stream:1,final:64,fused:64") == [("stream", 1), ("final", 64), ("fused", 64)]
    with pytest.raises(Exception, match="unknown arms"):
        parse_levels("fast:8")
