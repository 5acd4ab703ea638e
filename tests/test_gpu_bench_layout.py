"""The GPU benchmark's layouts (Ray can place every replica on its node, the engines on a GPU fit its memory,
as many replicas of a pool per node as it advertises units) and its per-level figures."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from cluster.config import ConfigError, load_config
from cluster.metrics import SPECS
from loadtests.gpu_bench.cli import parse_levels
from loadtests.gpu_bench.client import warm_up
from loadtests.gpu_bench.layouts import LAYOUTS, layout, parse_override, tag
from loadtests.gpu_bench.report import at_equal_p95, comparisons, merged
from loadtests.gpu_bench.stats import breakdown, engine_figures, steady_throughput, summarize


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_fits_its_replicas_on_the_gpus(name, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg, nodes = layout(name, 16, Path("models/bench"))
    assert cfg.router.steps.token_budget == 16 * cfg.router.steps.step_max_tokens
    memory = Counter()  # per GPU: the memory fraction its engines take (nodes that own the same GPU share it)
    for node in nodes:
        for role, pool in cfg.pools.items():
            replicas = node.resources.get(f"{role}_pool", 0)
            assert pool.placement.num_gpus * replicas <= len(node.gpus)  # Ray can place them on the node
            for gpu in node.gpus:  # a tensor-parallel engine takes its fraction on each of its GPUs
                memory[gpu] += (pool.engine.gpu_memory_utilization or 0) * replicas
    assert max(memory.values()) <= 1
    assert sorted(memory) == (["0", "1"] if name.endswith("2gpu") else ["0"])
    configured = dict(load_config("gpu-bench").pools.items())
    for role, pool in cfg.pools.items():
        assert pool.autoscaling.max_ongoing_requests == configured[role].autoscaling.max_ongoing_requests  # kept
        hosts = sum(node.resources.get(pool.placement.node_resource, 0) for node in nodes)
        assert pool.placement.node_resource_units == 1
        if pool.autoscaling.min_replicas > 0:  # large-only leaves the small pool at zero replicas, hosted nowhere
            assert pool.autoscaling.max_replicas <= hosts, f"{role}: more replicas than nodes to hold them"


def test_tensor_parallel_layout_spans_both_gpus_with_the_32b_shape(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    cfg, nodes = layout("tp2-32b-2gpu", 16, Path("models/bench"))
    large = dict(cfg.pools.items())["large"]
    assert large.engine.tensor_parallel_size == 2 and large.placement.num_gpus == 2
    assert large.engine.disable_custom_all_reduce  # NCCL all-reduce: vLLM's custom one failed on an H200 pair
    assert Path(large.model.path).name == "qwen2.5-32b"
    assert [(node.resources, node.gpus) for node in nodes] == [
        ({"small_pool": 1.0}, ("2",)),
        ({"small_pool": 1.0}, ("3",)),
        ({"large_pool": 1.0}, ("2", "3")),
    ]


def test_overrides_set_config_fields_last_and_name_the_result(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    override = parse_override("pools.large.engine.max_num_batched_tokens=512")
    assert override == ("pools.large.engine.max_num_batched_tokens", 512)
    cfg, _ = layout("routed-2gpu", 16, Path("models/bench"), dict([override]))
    assert dict(cfg.pools.items())["large"].engine.max_num_batched_tokens == 512
    assert dict(cfg.pools.items())["large"].engine.kv_cache_gib == 40  # the layout's own patch is kept
    assert tag(dict([override])) == "-max_num_batched_tokens512"
    with pytest.raises(ConfigError, match=r"pools\.large\.engine\.max_batch"):  # a typo is refused, not ignored
        layout("routed-2gpu", 16, Path("models/bench"), {"pools.large.engine.max_batch": 8})
    with pytest.raises(argparse.ArgumentTypeError):
        parse_override("pools.large.engine.max_num_batched_tokens")


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

    per_pool = {p: {"prompt_tokens": 10, "cached_prompt_tokens": 5} for p in ("small", "large")}
    result = {
        "seconds": 10.0,
        "start_s": 0.0,
        "end_s": 10.0,
        "ttft": 0.1,
        "usage": {"per_pool": per_pool},
        "routing": {
            "steps": [
                step("small", 300, 20, False),
                step("small", 500, 8, True),
                step("large", 900, 30, False),
                step("small", 400, 10, True),
            ]
        },
    }
    short = {**result, "routing": {"steps": result["routing"]["steps"][:2]}}  # stopped early (repeated steps)
    level = summarize(1, [result], 10.0, 30.0)
    assert level["step_ms_p50"] == {"small": 400, "large": 900}
    assert level["glimpse_ms_p50"] == {"call": 25, "fused": 9}
    assert level["call_ms_mean"] == {"glimpse": 25, "small_step": 400, "large_step": 900}  # separate glimpses only
    assert level["large_fraction"] == 0.25
    assert level["steady_rps"] is None  # one request: no window with every slot busy
    assert summarize(2, [result, short], 10.0, 30.0)["steps_per_request"] == 3


def test_steady_throughput_is_concurrency_over_the_latency_after_the_first_round():
    # two slots, one request after another in each: 10 s requests in slot A, 15 s then 10 s in slot B
    slot_a = [(0, 10), (10, 20), (20, 30), (30, 40)]
    slot_b = [(0, 15), (15, 25), (25, 35), (35, 45)]
    results = [{"start_s": s, "end_s": e} for s, e in slot_a + slot_b]
    # each slot completes 0.1/s once past the first round, where the whole level's 8 requests over 45 s (the
    # drain included) would say 0.178/s
    assert steady_throughput(results, 2) == 0.2
    # three slots whose first round ends spread out (19, 20, 21 s), then 20 s a request: 3 / 20 s, where
    # counting completions from the first end (19 s) to the last start would count the first round's tail
    spread = [(0, end) for end in (19, 20, 21)] + [
        (end + 20 * k, end + 20 * (k + 1)) for end in (19, 20, 21) for k in range(2)
    ]
    assert steady_throughput([{"start_s": s, "end_s": e} for s, e in spread], 3) == 0.15
    assert steady_throughput([{"start_s": 0, "end_s": 10}], 1) is None


def test_engine_figures_come_from_the_pools_engine_counters(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cfg, _ = layout("shared-2gpu", 16, Path("models/bench"))  # two replicas of each pool
    steps, tokens = SPECS["glimprouter_engine_iterations"].exported, SPECS["glimprouter_engine_tokens"].exported
    busy = SPECS["glimprouter_engine_busy_seconds"].exported
    decode, mixed = (frozenset({("pool", "small"), ("phase", phase)}) for phase in ("decode", "mixed"))
    moved = {
        (steps, decode): 3000.0,
        (steps, mixed): 1000.0,
        (busy, decode): 18.0,
        (busy, mixed): 12.0,  # of the two engines' 40 s
        (tokens, frozenset({("pool", "small"), ("kind", "decode")})): 80_000.0,
        (tokens, frozenset({("pool", "small"), ("kind", "prefill")})): 12_000.0,
    }
    requests, seconds = (
        SPECS[name].exported for name in ("glimprouter_engine_requests", "glimprouter_engine_request_seconds")
    )
    glimpses = frozenset({("pool", "small"), ("call", "glimpse")})
    moved.update(
        {
            (requests, glimpses): 400.0,
            **{
                (seconds, glimpses | {("part", part)}): value
                for part, value in (("queued", 2.0), ("running", 6.0), ("total", 20.0))
            },
        }
    )
    assert engine_figures(cfg, moved, 20.0, requests=50) == {
        "small": {
            "iterations_per_s": 200.0,
            "iterations_per_request": 80.0,
            "ms_per_iteration": 10.0,
            "busy_fraction": 0.75,
            "ms_per_busy_iteration": 7.5,
            "busy_ms_per_request": 600,
            "decode_tokens_per_iteration": 20.0,
            "prefill_tokens_per_s": 600,
            "mixed_fraction": 0.25,
            "ms_per_busy_iteration_by_phase": {"decode": 6.0, "mixed": 12.0},
            "prefill_tokens_per_mixed_iteration": 12.0,
            # no step ran to its end in this level: only glimpses
            "calls": {
                "glimpse": {"requests": 400, "ms": {"queued": 5.0, "running": 15.0, "total": 50.0, "outside": 30.0}}
            },
        }
    }


def test_breakdown_splits_a_request_into_calls_redis_and_the_rest():
    redis = "ray_glimprouter_redis_latency_seconds_sum"
    result = {
        "seconds": 10.0,
        "final_ms": 1000.0,
        "routing": {
            "steps": [
                {"pool": "small", "glimpse_ms": 20, "step_ms": 3000},
                {"pool": "large", "glimpse_ms": 30, "step_ms": 5000},
            ]
        },
    }
    row = breakdown(result, {(redis, frozenset()): 1.0}, {(redis, frozenset()): 1.05})
    assert row["glimpse_s"] == 0.05 and row["small_steps_s"] == 3.0 and row["large_steps_s"] == 5.0
    assert abs(row["redis_s"] - 0.05) < 1e-9 and abs(row["router_http_rest_s"] - 0.9) < 1e-9
    assert (row["large_steps"], row["steps"]) == (1, 2)


def test_warm_up_sends_its_requests_at_once():
    in_flight, most = 0, 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        chunk = {"id": "r", "choices": [{"delta": {"content": "w1"}}], "usage": {}, "routing": {}}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n")

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://bench") as client:
            await warm_up(client, SimpleNamespace(name="glimprouter"), concurrency=5, lag_s=0)

    asyncio.run(run())
    assert most == 5


def test_comparisons_give_ratios_at_equal_in_flight_and_at_the_baselines_p95():
    def level(arm, n, rps, p95, steady=None):
        return {"arm": arm, "concurrency": n, "throughput_rps": rps, "p95_s": p95, "steady_rps": steady}

    routed = {"levels": [level("stream", 64, 3.0, 20.0, 3.2), level("stream", 96, 4.0, 30.0, 4.4)]}
    # two baseline levels at 64 in flight (averaged: 2.0 req/s, p95 25 s), one at 32 whose p95 the curve lacks
    baseline = {
        "levels": [
            level("stream", 64, 1.9, 24.0, 2.0),
            level("stream", 64, 2.1, 26.0, 2.0),
            level("stream", 32, 1.2, 15.0, 1.3),
        ]
    }
    assert at_equal_p95(routed["levels"], 25.0, "throughput_rps") == 3.5  # halfway from 20 s to 30 s
    assert at_equal_p95(routed["levels"], 15.0, "throughput_rps") is None  # no extrapolation
    two_starts = [level("stream", 64, 2.6, 18.0), level("stream", 64, 3.4, 22.0), routed["levels"][1]]
    assert at_equal_p95(two_starts, 25.0, "throughput_rps") == 3.5  # the two at 64 averaged first (not 3.625)
    rows = comparisons(routed, baseline)
    assert rows == [
        {
            "arm": "stream",
            "in_flight": 32,
            "p95_s": None,
            "baseline_p95_s": 15.0,
            "throughput_rps_ratio": None,
            "throughput_rps_ratio_at_equal_p95": None,
            "steady_rps_ratio": None,
            "steady_rps_ratio_at_equal_p95": None,
        },
        {
            "arm": "stream",
            "in_flight": 64,
            "p95_s": 20.0,
            "baseline_p95_s": 25.0,
            "throughput_rps_ratio": 1.5,
            "throughput_rps_ratio_at_equal_p95": 1.75,
            "steady_rps_ratio": 1.6,
            "steady_rps_ratio_at_equal_p95": 1.9,
        },
    ]
    older = {"levels": [{key: value for key, value in lv.items() if key != "steady_rps"} for lv in baseline["levels"]]}
    assert "steady_rps_ratio" not in comparisons(routed, older)[1]  # a file without steady throughput


def test_compare_pools_the_levels_of_several_starts_and_refuses_unlike_files(tmp_path):
    def write(name, levels, steps=24, overrides=None):
        data = {"layout": "routed-2gpu", "steps": steps, "mps": False, "overrides": overrides or {}, "levels": levels}
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    first, second = write("a.json", [{"concurrency": 64}]), write("b.json", [{"concurrency": 96}])
    assert merged([first, second])["levels"] == [{"concurrency": 64}, {"concurrency": 96}]
    for unlike in (write("c.json", [], steps=16), write("d.json", [], overrides={"pools.small.engine.x": 1})):
        with pytest.raises(SystemExit, match="ran different setups: routed-2gpu, "):
            merged([first, unlike])
