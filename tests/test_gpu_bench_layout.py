"""The GPU benchmark's layouts (every replica fits a GPU node, as many replicas of a pool per node as it
advertises units) and its per-level figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.gpu_bench import ENGINE_METRICS, LAYOUTS, engine_figures, layout, parse_levels, summarize


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_places_each_replica_on_its_own_gpu_node(name, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg, nodes = layout(name, 16, Path("models/bench"))
    assert cfg.router.steps.token_budget == 16 * cfg.router.steps.step_max_tokens
    for node in nodes:
        assert len(node.gpus) == 1
        replicas = [(pool, node.resources.get(f"{role}_pool", 0)) for role, pool in cfg.pools.items()]
        assert sum(pool.placement.num_gpus * n for pool, n in replicas) <= 1  # they share its one GPU
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


def test_data_parallel_layout_puts_two_small_engines_on_the_first_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg, nodes = layout("routed-dp-2gpu", 16, Path("models/bench"))
    assert dict(cfg.pools.items())["small"].autoscaling.min_replicas == 2
    assert nodes[0].resources == {"small_pool": 2.0} and nodes[1].resources == {"large_pool": 1.0}


def test_level_summary_splits_step_and_glimpse_times_by_pool_and_kind():
    def step(pool, step_ms, glimpse_ms, fused):
        return {"pool": pool, "step_ms": step_ms, "glimpse_ms": glimpse_ms, "glimpse_fused": fused}

    result = {"seconds": 10.0, "ttft": 0.1, "usage": {"per_pool": {p: {"prompt_tokens": 10, "cached_prompt_tokens": 5}
                                                                     for p in ("small", "large")}},
              "routing": {"steps": [step("small", 300, 20, False), step("small", 500, 8, True),
                                    step("large", 900, 30, False), step("small", 400, 10, True)]}}
    level = summarize(1, [result], 10.0, 30.0)
    assert level["step_ms_p50"] == {"small": 400, "large": 900}
    assert level["glimpse_ms_p50"] == {"call": 25, "fused": 9}
    assert level["large_fraction"] == 0.25


def test_engine_figures_are_means_over_the_level():
    itl, queue = ENGINE_METRICS
    before = {(f"{itl}_sum", frozenset()): 1.0, (f"{itl}_count", frozenset()): 100.0}
    after = {(f"{itl}_sum", frozenset()): 2.0, (f"{itl}_count", frozenset()): 300.0,
             (f"{queue}_sum", frozenset()): 0.5, (f"{queue}_count", frozenset()): 10.0}
    assert engine_figures(before, after) == {"inter_token_ms": 5.0, "queue_ms": 50.0}
    assert engine_figures(after, after) == {"inter_token_ms": None, "queue_ms": None}
