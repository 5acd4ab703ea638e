"""On the real local cluster: node-pool placement, metrics, live scaling and autoscaling of one pool,
and the load-aware tau controller."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.metrics import SPECS
from cluster.ops import operators

pytestmark = pytest.mark.cluster


def details() -> dict:
    return operators.serve_details()


def deployment(name: str) -> dict:
    return details()["applications"]["glimprouter"]["deployments"][name]


def replica_ids(name: str) -> set[str]:
    return {r["replica_id"] for r in deployment(name)["replicas"]}


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def chat(base_url: str, key: str, **extra) -> httpx.Response:
    body = {
        "model": "glimprouter",
        "messages": [{"role": "user", "content": "Count from 1 to 30, one per line."}],
        "temperature": 0,
        **extra,
    }
    return httpx.post(
        f"{base_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600
    )


def test_each_pool_runs_on_its_own_node(local_cluster):
    import ray

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    for name, resource, other in (("SmallPool", "small_pool", "large_pool"), ("LargePool", "large_pool", "small_pool")):
        for replica in deployment(name)["replicas"]:
            assert resource in nodes[replica["node_id"]] and other not in nodes[replica["node_id"]], name


def test_scaling_one_pool_changes_only_that_pool_and_autoscales_it(local_cluster):
    small_before, large_before = replica_ids("SmallPool"), replica_ids("LargePool")
    large_config = deployment("LargePool")["deployment_config"]
    original = deployment("SmallPool")["deployment_config"]["autoscaling_config"]
    key = local_cluster.new_tenant("burst", max_concurrent_requests=16)
    scale = [
        "scale",
        "small",
        "--min",
        "1",
        "--max",
        "2",
        "--target-ongoing",
        "1",
        "--upscale-delay",
        "1",
        "--downscale-delay",
        "5",
    ]
    from cluster.ops.cli import main

    try:
        assert main(scale) == 0
        small = wait_for(
            lambda: (
                (d := deployment("SmallPool"))["deployment_config"]["autoscaling_config"]["target_ongoing_requests"]
                == 1
                and d
            ),
            30,
            "the new bounds",
        )
        assert {r["replica_id"] for r in small["replicas"]} == small_before  # applied without restarting
        assert replica_ids("LargePool") == large_before and deployment("LargePool")["deployment_config"] == large_config

        with ThreadPoolExecutor(6) as pool:  # a burst of small-only requests: every step on the small pool
            burst = [
                pool.submit(
                    chat, local_cluster.base_url, key, policy="small_only", token_budget=400, step_max_tokens=100
                )
                for _ in range(6)
            ]
            wait_for(lambda: deployment("SmallPool")["target_num_replicas"] == 2, 120, "the small pool to scale up")
            assert deployment("LargePool")["target_num_replicas"] == 1
            assert all(f.result().status_code == 200 for f in burst)
        wait_for(lambda: deployment("SmallPool")["target_num_replicas"] == 1, 120, "the idle small pool to scale down")
        assert replica_ids("LargePool") == large_before
    finally:
        bounds = {
            k: original[k]
            for k in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
        }
        main(
            [
                "scale",
                "small",
                "--min",
                str(bounds["min_replicas"]),
                "--max",
                str(bounds["max_replicas"]),
                "--target-ongoing",
                str(bounds["target_ongoing_requests"]),
                "--upscale-delay",
                str(bounds["upscale_delay_s"]),
                "--downscale-delay",
                str(bounds["downscale_delay_s"]),
            ]
        )


def test_tau_controller_sends_fewer_steps_to_a_queued_large_pool(local_cluster):
    """tau 0 sends every step to the large pool; 12 such requests at once queue it (12 calls in flight, above
    the local config's queue_high of 6), so the controller raises tau and later steps go to the small pool."""
    key = local_cluster.new_tenant("tau-control", max_concurrent_requests=16)
    endpoints = operators.metrics_endpoints()
    ups = SPECS["glimprouter_tau_changes"].exported
    before = operators.scrape(endpoints)
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: chat(local_cluster.base_url, key, tau=0.0, token_budget=240), range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    pools = [s["pool"] for r in responses for s in r.json()["routing"]["steps"]]
    # with tau 0 every entropy (>= 0) routes large: each small step is the controller's doing
    assert pools.count("small") > 0, "the controller raised tau while the large pool was queued"
    after = wait_for(
        lambda: (
            (a := operators.scrape(endpoints))
            and operators.total(a, ups, direction="down") > operators.total(before, ups, direction="down")
            and a
        ),
        40,
        "tau to fall back as the queue drains",
    )
    assert operators.total(after, ups, direction="up") > operators.total(before, ups, direction="up")
    wait_for(
        lambda: operators.total(operators.scrape(endpoints), SPECS["glimprouter_tau_offset_nats"].exported) == 0,
        40,
        "the tau offset to return to zero",
    )


def test_every_metric_is_exported_and_moves(local_cluster):
    """Every counter and histogram moves with two requests here, and every gauge is exported, whatever ran
    before: but the three that only faults move, each asserted by its own test (``glimprouter_tau_changes`` by the
    tau controller's, ``glimprouter_pool_retries`` by tests/test_cluster_reliability.py's pool kill,
    ``glimprouter_rejections`` by tests/test_cluster_api.py's rate limit)."""
    key = local_cluster.new_tenant("metrics-check")
    endpoints = operators.metrics_endpoints()
    before = operators.scrape(endpoints)
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: chat(local_cluster.base_url, key, tau=0.0), range(2)))
    assert all(r.status_code == 200 for r in responses)
    series = {spec.name: spec.exported + ("_count" if spec.kind == "histogram" else "") for spec in SPECS.values()}
    faults_only = ("glimprouter_tau_changes", "glimprouter_pool_retries", "glimprouter_rejections")
    moving = [n for name, n in series.items() if SPECS[name].kind != "gauge" and name not in faults_only]

    def all_moved():
        after = operators.scrape(endpoints)
        present = {name for name, _ in after}
        done = {n for name, n in series.items() if name not in faults_only} <= present and all(
            operators.total(after, n) > operators.total(before, n) for n in moving
        )
        return after if done else None

    def lagging() -> list[str]:
        latest = operators.scrape(endpoints)
        present = {name for name, _ in latest}
        return sorted({n for name, n in series.items() if name not in faults_only} - present) + [
            n for n in moving if operators.total(latest, n) <= operators.total(before, n)
        ]

    try:
        after = wait_for(all_moved, 120, "every metric to be exported and to move (Ray exports every few seconds)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; missing or not moved: {lagging()}") from None
    assert operators.total(after, SPECS["glimprouter_steps"].exported, tenant="metrics-check", pool="large") > 0
    assert operators.total(after, SPECS["glimprouter_large_step_fraction"].exported) > 0  # tau 0: steps go large
    engine_tokens = SPECS["glimprouter_engine_tokens"].exported
    for pool in ("small", "large"):  # the glimpses ran on the small pool's engine, the steps on the large one's
        assert operators.total(after, engine_tokens, pool=pool, kind="prefill") > operators.total(
            before, engine_tokens, pool=pool, kind="prefill"
        )
    assert operators.total(after, engine_tokens, pool="large", kind="decode") > operators.total(
        before, engine_tokens, pool="large", kind="decode"
    )
    requests, seconds = (
        SPECS[name].exported for name in ("glimprouter_engine_requests", "glimprouter_engine_request_seconds")
    )
    for pool, call in (("small", "glimpse"), ("large", "generate")):  # the glimpses' calls, the steps' calls
        assert operators.total(after, requests, pool=pool, call=call) > operators.total(
            before, requests, pool=pool, call=call
        )
        moved = {
            part: operators.total(after, seconds, pool=pool, call=call, part=part)
            - operators.total(before, seconds, pool=pool, call=call, part=part)
            for part in ("running", "total")
        }
        assert moved["total"] > moved["running"] > 0  # a request's whole time in the engine holds its run
