"""The system simulator (cluster/ops/planner/simulator.py): its invariants, on the committed profiles."""

from __future__ import annotations

import statistics

import pytest

from cluster.ops.planner.simulator import Hardware, Simulator, simulate
from cluster.ops.planner.system import CallCost, Overheads, RequestShape, Routing, parse_layout, spec_of

SHORT = RequestShape(prompt_tokens=200, steps=8, step_tokens=48, final_tokens=32)
H200 = Hardware(gpu="NVIDIA H200")


def test_littles_law_in_a_closed_loop():
    n = 32
    sim = Simulator(parse_layout("s,l"), SHORT, H200)
    sim.closed_loop(n, 8 * n)
    spans = sim.latencies
    first_end = min(e for _, e in spans)
    last_start = max(s for s, _ in spans)
    window = [(s, e) for s, e in spans if first_end <= s and e <= last_start]  # while every slot is busy
    rate = len(window) / (max(e for _, e in window) - min(s for s, _ in window))
    mean_latency = statistics.fmean(e - s for s, e in window)
    assert rate * mean_latency == pytest.approx(n, rel=0.1)


@pytest.mark.parametrize("specs", [("l", "2xl", "3xl"), ("s,l", "s,2xl", "s,3xl")])
def test_throughput_rises_with_replicas(specs):
    shape = SHORT if "s" in specs[0] else RequestShape(steps=8, step_tokens=48, final_tokens=32, arm="large")
    rps = [simulate(parse_layout(s), shape, in_flight=96, hardware=H200).throughput_rps for s in specs]
    assert rps[0] < rps[1] < rps[2]


def test_large_only_needs_no_small_pool():
    shape = RequestShape(steps=8, step_tokens=48, final_tokens=32, arm="large")
    alone = simulate(parse_layout("l"), shape, in_flight=8, hardware=H200)
    assert set(alone.pools) == {"large"} and alone.requests == 16
    beside = Simulator(parse_layout("s+l"), shape, H200)
    beside.closed_loop(8, 16)
    assert sum(beside.pools["small"][0].iterations.values()) == 0


def test_routed_request_without_small_pool_is_refused():
    with pytest.raises(ValueError, match="no small replica"):
        simulate(parse_layout("l"), SHORT, in_flight=1, hardware=H200)


def test_light_open_loop_serves_its_rate_at_single_stream_latency():
    one = simulate(parse_layout("s,l"), SHORT, in_flight=1, requests=3, hardware=H200)
    light = simulate(parse_layout("s,l"), SHORT, rate=0.05, duration_s=2000, hardware=H200)
    assert light.unfinished == 0
    assert light.throughput_rps == pytest.approx(0.05, rel=0.2)
    assert light.p50_s == pytest.approx(one.p50_s, rel=0.1)


def test_overload_shows_as_unfinished_or_long_latency():
    ok = simulate(parse_layout("s,l"), SHORT, rate=1.0, duration_s=200, hardware=H200)
    over = simulate(parse_layout("s,l"), SHORT, rate=40.0, duration_s=200, hardware=H200)
    assert over.p95_s > 3 * ok.p95_s or over.unfinished > 0


def test_prefix_cache_hits_follow_who_wrote_the_tokens():
    routed = simulate(parse_layout("s,l"), RequestShape(steps=16), in_flight=4, hardware=H200)
    large = simulate(parse_layout("l"), RequestShape(steps=16, arm="large"), in_flight=4, hardware=H200)
    # the large pool prefills what the small one wrote; alone it wrote every token itself
    assert routed.pools["large"]["cache_hit"] < large.pools["large"]["cache_hit"]
    assert routed.pools["small"]["cache_hit"] > routed.pools["large"]["cache_hit"]


def test_more_large_steps_cost_more():
    fractions = [0.1, 0.5, 0.9]
    rps = [
        simulate(
            parse_layout("s,l"), RequestShape(steps=8, routing=Routing(f)), in_flight=64, hardware=H200
        ).throughput_rps
        for f in fractions
    ]
    assert rps[0] > rps[1] > rps[2]


def test_overheads_lengthen_requests():
    none = CallCost(0.0, 0.0)
    free = Overheads(glimpse=none, small_step=none, large_step=none, per_step_ms=0.0, per_request_ms=0.0)
    base = simulate(parse_layout("s,l"), SHORT, in_flight=16, hardware=H200, overheads=free)
    fitted = simulate(parse_layout("s,l"), SHORT, in_flight=16, hardware=H200)
    assert fitted.p50_s > base.p50_s


def test_routing_schedules():
    import random

    rng = random.Random(1)
    forced = Routing(0.25, "per_request").schedule(24, rng)
    assert sum(forced) == 6
    aligned = Routing(0.25, "aligned").schedule(8, rng)
    assert aligned == [False, False, False, True] * 2
    entropy = Routing(entropy_mu=0.0, entropy_sigma=0.5, tau=1.0)
    assert entropy.fraction() == pytest.approx(0.5)
    drawn = [x for _ in range(200) for x in entropy.schedule(10, rng)]
    assert sum(drawn) / len(drawn) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(("text", "spec"), [("routed-2gpu", "s,l"), ("s+l, 2xl", "s+l,2xl"), ("4xs+s", "4xs+s")])
def test_layout_specs_round_trip(text, spec):
    assert spec_of(parse_layout(text)) == spec


@pytest.mark.parametrize("bad", ["s+x", "3y", ""])
def test_bad_layout_spec(bad):
    with pytest.raises(ValueError):
        parse_layout(bad)
