"""Figures of a level: throughput (over the level and steady), latency and TTFT percentiles, goodput, and each
pool's engine figures from the pools' counters; one request's time broken down."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from cluster.config import ClusterConfig
from cluster.metrics import SPECS
from cluster.ops.operators import delta, total
from deployments.pool import CALLS, PHASES, REQUEST_PARTS


def breakdown(result: dict, before: dict, after: dict) -> dict:
    """Where one request's time went: the pool calls as the router timed them (glimpses, small and large steps,
    the final answer), Redis (the router's round trips; Ray exports a histogram's sum from its bucket midpoints,
    so this one is approximate) and the rest (router, Serve proxy, HTTP, client)."""
    steps = result["routing"]["steps"]
    calls = {
        "glimpse_s": sum(s["glimpse_ms"] for s in steps) / 1e3,
        **{f"{p}_steps_s": sum(s["step_ms"] for s in steps if s["pool"] == p) / 1e3 for p in ("small", "large")},
        "final_s": result["final_ms"] / 1e3,
    }
    redis = total(delta(after, before), "ray_glimprouter_redis_latency_seconds_sum")
    return {
        "total_s": result["seconds"],
        **calls,
        "redis_s": redis,
        "router_http_rest_s": result["seconds"] - sum(calls.values()) - redis,
        "large_steps": sum(s["pool"] == "large" for s in steps),
        "steps": len(steps),
    }


def engine_figures(cfg: ClusterConfig, moved: dict, wall_s: float, requests: int) -> dict:
    """Each pool's engines over a level of ``requests`` requests, from the pools' engine counters: scheduler
    iterations per second (all replicas) and per request, time per iteration of one engine (the level's wall
    time over its iterations: idle time counts, so an upper bound), the engines' busy fraction, time per busy
    iteration (idle time left out) and busy time per request (engines that share a GPU overlap), decode tokens
    per iteration (the batch) and prefill tokens per second; then the iterations that computed prefill tokens
    (``mixed``) apart from the decode-only ones: their share, time per busy iteration of each, and prefill tokens
    per mixed iteration; and the engine requests by call (``call_figures``)."""
    figures = {}
    for role, pool in cfg.pools.items():
        iterations = total(moved, SPECS["glimprouter_engine_iterations"].exported, pool=role)
        if not iterations:
            continue
        busy_s = total(moved, SPECS["glimprouter_engine_busy_seconds"].exported, pool=role)
        tokens = {
            kind: total(moved, SPECS["glimprouter_engine_tokens"].exported, pool=role, kind=kind)
            for kind in ("decode", "prefill")
        }
        replicas = pool.autoscaling.max_replicas
        phase_iterations, phase_busy_s = (
            {phase: total(moved, SPECS[name].exported, pool=role, phase=phase) for phase in PHASES}
            for name in ("glimprouter_engine_iterations", "glimprouter_engine_busy_seconds")
        )
        figures[role] = {
            "iterations_per_s": round(iterations / wall_s, 1),
            "iterations_per_request": round(iterations / requests, 1),
            "ms_per_iteration": round(1e3 * wall_s * replicas / iterations, 2),
            "busy_fraction": round(busy_s / (wall_s * replicas), 3),
            "ms_per_busy_iteration": round(1e3 * busy_s / iterations, 2),
            "busy_ms_per_request": round(1e3 * busy_s / requests),
            "decode_tokens_per_iteration": round(tokens["decode"] / iterations, 1),
            "prefill_tokens_per_s": round(tokens["prefill"] / wall_s),
            **phase_figures(phase_iterations, phase_busy_s),
            "prefill_tokens_per_mixed_iteration": round(tokens["prefill"] / phase_iterations["mixed"], 1)
            if phase_iterations["mixed"]
            else 0.0,
            "calls": call_figures(moved, role),
        }
    return figures


def call_figures(moved: dict, role: str) -> dict:
    """A pool's engine requests over a level by call (``deployments.pool.CALLS``): how many ran to their end, and
    the mean milliseconds of each part of one (``deployments.pool.request_times``), with ``outside``: the total
    less queued and running, the way into and out of the engine core."""
    figures = {}
    for call in CALLS:
        if not (requests := total(moved, SPECS["glimprouter_engine_requests"].exported, pool=role, call=call)):
            continue
        ms = {
            part: round(
                1e3
                * total(moved, SPECS["glimprouter_engine_request_seconds"].exported, pool=role, call=call, part=part)
                / requests,
                1,
            )
            for part in REQUEST_PARTS
        }
        figures[call] = {
            "requests": round(requests),
            "ms": {**ms, "outside": round(ms["total"] - ms["queued"] - ms["running"], 1)},
        }
    return figures


def phase_figures(iterations: Mapping[str, float], busy_s: Mapping[str, float]) -> dict:
    """From an engine's iterations and busy seconds by phase (see ``deployments.pool.PHASES``): the share of
    mixed iterations and the time per busy iteration of each phase."""
    return {
        "mixed_fraction": round(iterations["mixed"] / max(sum(iterations.values()), 1), 3),
        "ms_per_busy_iteration_by_phase": {
            phase: round(1e3 * busy_s[phase] / iterations[phase], 2) for phase in PHASES if iterations[phase]
        },
    }


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def steady_throughput(results: list[dict], concurrency: int) -> float | None:
    """Requests per second while every slot of the closed loop was busy, by Little's law: ``concurrency`` over the
    mean latency of the requests started from the first completion on (the first round, started all at once,
    is left out). ``None`` when no request started after the first completion."""
    first_end = min(r["end_s"] for r in results)
    later = [r["end_s"] - r["start_s"] for r in results if r["start_s"] >= first_end]
    return round(concurrency / statistics.fmean(later), 4) if later else None


def summarize(concurrency: int, results: list[dict], wall: float, bound_s: float) -> dict:
    """Throughput (over the whole level, and steady while every slot was busy), latency and TTFT percentiles,
    goodput under ``bound_s``, steps per request (fewer than the budget: requests stopped early) and the
    large-step fraction."""
    latency = [r["seconds"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None] or [math.nan]  # nan: not streamed
    steps = [s for r in results for s in r["routing"]["steps"]]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 4),
        "steady_rps": steady_throughput(results, concurrency),
        "p50_s": round(statistics.median(latency), 2),
        "p95_s": round(percentile(latency, 0.95), 2),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
        "goodput_rps": round(sum(x <= bound_s for x in latency) / wall, 4),
        "latency_bound_s": bound_s,
        "steps_per_request": round(len(steps) / len(results), 2),
        "large_fraction": round(sum(s["pool"] == "large" for s in steps) / len(steps), 3),
        "step_ms_p50": {
            p: round(statistics.median(ms), 1)
            for p in ("small", "large")
            if (ms := [s["step_ms"] for s in steps if s["pool"] == p])
        },
        "glimpse_ms_p50": {
            kind: round(statistics.median(ms), 1)
            for kind, fused in (("call", False), ("fused", True))
            if (ms := [s["glimpse_ms"] for s in steps if s["glimpse_fused"] is fused and s["glimpse_ms"]])
        },
        # beside the engines' own times of their calls (``call_figures``; they also count fused glimpses as
        # glimpses and the large pool's final answers as its calls): the rest is Serve and the replicas
        "call_ms_mean": {
            call: round(statistics.fmean(ms), 1)
            for call, ms in (
                ("glimpse", [s["glimpse_ms"] for s in steps if not s["glimpse_fused"] and s["glimpse_ms"]]),
                *((f"{p}_step", [s["step_ms"] for s in steps if s["pool"] == p]) for p in ("small", "large")),
            )
            if ms
        },
        "cache_hit": {
            p: round(
                sum(r["usage"]["per_pool"][p]["cached_prompt_tokens"] for r in results)
                / max(1, sum(r["usage"]["per_pool"][p]["prompt_tokens"] for r in results)),
                3,
            )
            for p in ("small", "large")
        },
    }
