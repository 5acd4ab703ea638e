"""GPU benchmark driver: the whole system (Redis, Ray, both vLLM pools, the router) on the device machine,
driven through the HTTP API.

    python -m loadtests.gpu_bench single [--layout one-gpu] [--requests 3] [--set PATH=VALUE ...]
    python -m loadtests.gpu_bench load --layout shared-2gpu --levels stream:1,stream:64,fused:64 [--steps 16] [--mps]
    python -m loadtests.gpu_bench plot results/gpu/load-*.json
    python -m loadtests.gpu_bench compare results/gpu/routed-*.json --baseline results/gpu/large-only-*.json

Settings come from ``cluster/configs/gpu-bench.yaml``; ``--layout`` patches its placement and replicas and
starts local Ray nodes, each owning its GPUs and advertising the pools it hosts (see ``LAYOUTS``: a node per
GPU, and for tensor parallelism one more that owns both); ``--set`` overrides any
field last (a lever under test), and the result file names it. The model folders have
real Qwen2.5 shapes and random weights (``loadtests.gpu_models``), so the routing is forced (see the config)
and every run says so. ``single`` breaks each request's time down from the system's own metrics; ``load``
warms up with one request per slot of its largest level, then runs closed loops at fixed numbers of requests
in flight (``--rounds`` requests per slot), for client arms (``ARMS``: streamed, not streamed, streamed with
fused glimpses or with glimpses in the step calls, and two streamed baselines by request policy: ``random``
routing, which takes no glimpse, and ``large`` only) on one running system; each level records throughput
(over the level, and steady while every slot was busy), latency, TTFT, goodput, steps per request,
prefix-cache hits, each pool's step and glimpse times, and each pool's engine iterations, busy time (both also
by phase: decode-only or mixed with prefill), tokens, and its requests' time queued, running and in all by call
(from the pools' engine counters; the router's mean time of each kind of call beside them). Results go to
``results/gpu/`` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx
from pydantic import ValidationError

from cluster.config import ClusterConfig, ConfigError, format_validation_error, load_config
from cluster.ops.launcher import HEAD_METRICS_PORT, LocalNode, local_gpus
from cluster.metrics import SPECS
from cluster.ops.operators import delta, scrape, total
from deployments.pool import CALLS, PHASES, REQUEST_PARTS
from loadtests.gpu_models import SHAPES, build_model, build_tokenizer

RESULTS = Path("results/gpu")
FORCED = "routing forced: random weights make every first-token entropy equal; a glimpse still runs before every step"


GPU0, GPU1, BOTH = (0,), (1,), (0, 1)
LAYOUTS = {  # name: (what it places where, [(replicas of each pool on a local Ray node, the GPUs the node owns)])
    "one-gpu": ("both pools on one GPU (the single-stream layout)", [({"small": 1, "large": 1}, GPU0)]),
    "routed-2gpu": ("small pool on GPU 0, large pool on GPU 1", [({"small": 1}, GPU0), ({"large": 1}, GPU1)]),
    "shared-2gpu": ("one small and one large replica on each GPU",
                    [({"small": 1, "large": 1}, GPU0), ({"small": 1, "large": 1}, GPU1)]),
    "routed-dp-2gpu": ("two small replicas on GPU 0 (data parallel), the large pool on GPU 1",
                       [({"small": 2}, GPU0), ({"large": 1}, GPU1)]),
    "large-only-2gpu": ("one large replica on each GPU, policy large_only", [({"large": 1}, GPU0), ({"large": 1}, GPU1)]),
    "tp2-32b-2gpu": ("the large pool as Qwen2.5-32B over both GPUs (tensor parallel 2), a small replica on each GPU",
                     [({"small": 1}, GPU0), ({"small": 1}, GPU1), ({"large": 1}, BOTH)]),
}
DEVICE_ENV = {  # for the Ray nodes the driver starts, and so for the engines
    # Hosts whose GPUs others share may forbid NVLink multicast (the lent ones do); vLLM's symmetric-memory
    # all-reduce uses it.
    "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
    # A replica that fails to start fails the run at its first try, not its third (device time is short).
    "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1",
}
METRICS_LAG_S = 12  # Ray exports metrics every few seconds


def layout(name: str, steps: int, models_dir: Path, overrides: dict | None = None
           ) -> tuple[ClusterConfig, list[LocalNode]]:
    """The benchmark config and local Ray nodes (each advertising the pools it hosts, owning its GPUs) for
    ``name``, with ``steps`` steps per request, absolute model folders and ``{dotted.path: value}`` overrides
    set last."""
    data = load_config("gpu-bench").model_dump(mode="json", exclude_none=True)
    small, large = data["pools"]["small"], data["pools"]["large"]
    if name == "tp2-32b-2gpu":
        large["model"]["path"] = "qwen2.5-32b"
        # NCCL all-reduce: with vLLM's custom one the lent H200 pair failed the engine's first pass
        large["engine"].update(tensor_parallel_size=2, gpu_memory_utilization=0.75, kv_cache_gib=20,
                               disable_custom_all_reduce=True)
        large["placement"]["num_gpus"] = 2
    for pool in data["pools"].values():
        for key in ("path", "tokenizer"):
            pool["model"][key] = str(models_dir.resolve() / Path(pool["model"][key]).name)
    data["router"]["steps"]["token_budget"] = steps * data["router"]["steps"]["step_max_tokens"]
    hosts = LAYOUTS[name][1]
    for role, pool in (("small", small), ("large", large)):
        pool["placement"].update(node_resource=f"{role}_pool", node_resource_units=1)
        if (replicas := sum(pools.get(role, 0) for pools, _ in hosts)) > 1:
            pool["autoscaling"].update(min_replicas=replicas, max_replicas=replicas)
    if name in ("routed-2gpu", "routed-dp-2gpu", "large-only-2gpu"):  # each pool has GPUs of its own
        for pool, kv in ((small, 16), (large, 40)):
            pool["placement"]["num_gpus"] = 1
            pool["engine"].update(gpu_memory_utilization=0.85, kv_cache_gib=kv)
    if name == "routed-dp-2gpu":  # two small engines share GPU 0: each its own scheduler process
        small["placement"]["num_gpus"] = 0.5
        small["engine"].update(gpu_memory_utilization=0.4, kv_cache_gib=12)
    if name == "large-only-2gpu":
        small["autoscaling"].update(min_replicas=0, max_replicas=1, initial_replicas=0)
        data["router"]["policy"] = {"policy": "large_only"}
    gpus = local_gpus()
    nodes = [LocalNode({f"{role}_pool": float(n) for role, n in pools.items()}, tuple(gpus[i] for i in owned))
             for pools, owned in hosts]
    return with_overrides(data, overrides or {}, f"layout {name}"), nodes


def with_overrides(data: dict, overrides: dict, what: str) -> ClusterConfig:
    """The config ``data`` with ``{dotted.path: value}`` overrides set, validated (``what`` names it in the
    error)."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{what}: invalid config\n{format_validation_error(exc)}") from exc


def prompt_text(seed: int, tokens: int = 200) -> str:
    """A user message of exactly ``tokens`` words of the benchmark tokenizer (one token each)."""
    rnd = random.Random(seed)
    return " ".join(f"w{rnd.randrange(1000, 150000)}" for _ in range(tokens))


async def bench_key(cfg: ClusterConfig) -> str:
    """A tenant without practical limits, for the benchmark."""
    import redis.asyncio as aioredis

    from router_service.tenancy import TenantSettings, TenantStore

    client = aioredis.Redis.from_url(cfg.redis.url)
    store = TenantStore(client)
    if await store.get_tenant("bench") is not None:
        await store.delete_tenant("bench")
    _, key = await store.create_tenant("bench", TenantSettings(
        policy=cfg.router.policy, max_token_budget=100_000, requests_per_minute=1_000_000,
        tokens_per_minute_small=1_000_000_000, tokens_per_minute_large=1_000_000_000,
        max_concurrent_requests=10_000))
    await client.aclose()
    return key


async def start(cfg: ClusterConfig, nodes: list[LocalNode]) -> tuple[str, str]:
    """Bring the system up for ``cfg`` on ``nodes`` (blocking while the engines start); returns (base URL, key)."""
    from cluster.ops import launcher

    subprocess.run([sys.executable, "-m", "cluster", "down"], check=False)
    os.environ.update(DEVICE_ENV)
    base = launcher.up(cfg, num_cpus=8, nodes=nodes)
    return base, await bench_key(cfg)


STREAMED = {"stream": True, "stream_options": {"include_usage": True}}
ARMS = {  # request fields of each client arm
    "stream": STREAMED,
    "final": {"stream": False},
    "fused": {**STREAMED, "fused_glimpse": True},
    "instep": {**STREAMED, "glimpse_in_step": True},
    "random": {**STREAMED, "policy": "random"},  # 25%, at random steps
    "large": {**STREAMED, "policy": "large_only"},
}


async def one_request(client: httpx.AsyncClient, model: str, seed: int, fields: dict) -> dict:
    """One chat completion with ``fields`` (an arm's, plus any policy): wall time, time to first token (streamed
    only), usage and routing."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt_text(seed)}], **fields}
    t0 = time.perf_counter()
    if not body.get("stream"):
        response = await client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        data = response.json()
        return {"id": data["id"], "seconds": time.perf_counter() - t0, "ttft": None, "usage": data["usage"],
                "routing": data["routing"]}
    ttft, usage, routing, rid = None, None, None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk.get("id", rid)
            delta = (chunk.get("choices") or [{}])[0].get("delta", {})
            if ttft is None and (delta.get("content") or delta.get("reasoning_content")):
                ttft = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
            routing = chunk.get("routing") or routing
    return {"id": rid, "seconds": time.perf_counter() - t0, "ttft": ttft, "usage": usage, "routing": routing}


async def warm_up(client: httpx.AsyncClient, cfg: ClusterConfig, concurrency: int = 1,
                  lag_s: float = METRICS_LAG_S) -> None:
    """``concurrency`` requests at once, then ``lag_s`` for their metrics to be exported (so that they are not
    counted in the first level). At the load's largest concurrency this runs the engines' kernels at the levels'
    batch shapes before any level is measured: in each start of the sixth GPU run whose engines had just
    compiled, the first level had a time-to-first-token tail of 3-10 s that later levels did not have."""
    await asyncio.gather(*(one_request(client, cfg.name, 999 + i, ARMS["stream"]) for i in range(concurrency)))
    await asyncio.sleep(lag_s)


def breakdown(result: dict, before: dict, after: dict) -> dict:
    """Where one request's time went: the pool calls as the router timed them (glimpses, small and large steps,
    the final answer), Redis (the router's round trips; Ray exports a histogram's sum from its bucket midpoints,
    so this one is approximate) and the rest (router, Serve proxy, HTTP, client)."""
    steps = result["routing"]["steps"]
    calls = {"glimpse_s": sum(s["glimpse_ms"] for s in steps) / 1e3,
             **{f"{p}_steps_s": sum(s["step_ms"] for s in steps if s["pool"] == p) / 1e3 for p in ("small", "large")},
             "final_s": result["final_ms"] / 1e3}
    redis = total(delta(after, before), "ray_glimprouter_redis_latency_seconds_sum")
    return {"total_s": result["seconds"], **calls, "redis_s": redis,
            "router_http_rest_s": result["seconds"] - sum(calls.values()) - redis,
            "large_steps": sum(s["pool"] == "large" for s in steps), "steps": len(steps)}


async def single(args) -> None:
    cfg, nodes = layout(args.layout, args.steps, args.models, args.set)
    base, key = await start(cfg, nodes)
    endpoints = [f"http://127.0.0.1:{HEAD_METRICS_PORT + i}/metrics" for i in range(len(nodes))]
    rows = []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=3600) as client:
        await warm_up(client, cfg)
        for label, fields, n in (("routed", ARMS["stream"], args.requests),
                                 ("large_only", ARMS["large"], 1)):
            for i in range(n):
                before = scrape(endpoints)
                result = await one_request(client, cfg.name, i, fields)
                result["final_ms"] = (await client.get(f"/v1/requests/{result['id']}")).json()["final"]["ms"]
                await asyncio.sleep(METRICS_LAG_S)
                row = {"policy": label, **breakdown(result, before, scrape(endpoints))}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    save(args.out, f"single-{args.layout}{tag(args.set)}", {"layout": args.layout, "overrides": args.set,
                                                           "steps": args.steps, "note": FORCED, "rows": rows})


@contextlib.contextmanager
def mps_daemon(enabled: bool):
    """With ``enabled``, run the block under CUDA MPS: start a control daemon for this run (its pipe in a fresh
    folder, named in the environment that Ray and the engines inherit), and afterwards stop the system and then
    the daemon, so that the machine is left as it was. MPS lets the engines that share a GPU run their kernels
    concurrently instead of time-sliced."""
    if not enabled:
        yield
        return
    folder = tempfile.mkdtemp(prefix="mps-")
    os.environ.update(CUDA_MPS_PIPE_DIRECTORY=folder, CUDA_MPS_LOG_DIRECTORY=folder)
    subprocess.run(["nvidia-cuda-mps-control", "-d"], check=True)
    print(f"CUDA MPS control daemon started (pipe {folder})", flush=True)
    try:
        yield
    finally:
        subprocess.run([sys.executable, "-m", "cluster", "down"], check=False)
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", check=False)
        print("CUDA MPS control daemon stopped", flush=True)


async def load(args) -> None:
    cfg, nodes = layout(args.layout, args.steps, args.models, args.set)
    base, key = await start(cfg, nodes)
    endpoints = [f"http://127.0.0.1:{HEAD_METRICS_PORT + i}/metrics" for i in range(len(nodes))]
    result = {"layout": args.layout, "placement": LAYOUTS[args.layout][0], "mps": args.mps, "overrides": args.set,
              "steps": args.steps, "note": FORCED, "levels": []}
    name = f"load-{args.layout}{'-mps' if args.mps else ''}{tag(args.set)}"
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=3600,
                                 limits=limits) as client:
        await warm_up(client, cfg, max(concurrency for _, concurrency in args.levels))
        seen = scrape(endpoints)
        for arm, concurrency in args.levels:
            n = max(2, args.rounds * concurrency)
            gate = asyncio.Semaphore(concurrency)

            async def gated(i: int) -> dict:
                async with gate:
                    start = time.perf_counter() - t0
                    done = await one_request(client, cfg.name, 10_000 * concurrency + i, ARMS[arm])
                    return {**done, "start_s": start, "end_s": time.perf_counter() - t0}

            t0 = time.perf_counter()
            results = await asyncio.gather(*(gated(i) for i in range(n)))
            wall = time.perf_counter() - t0
            await asyncio.sleep(METRICS_LAG_S)
            now = scrape(endpoints)
            level = {"arm": arm, **summarize(concurrency, results, wall, args.latency_bound),
                     "engines": engine_figures(cfg, delta(now, seen), wall, len(results))}
            seen = now
            result["levels"].append(level)
            print(json.dumps(level), flush=True)
            save(args.out, name, result)  # after every level: a cut-off run keeps what it measured


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
        tokens = {kind: total(moved, SPECS["glimprouter_engine_tokens"].exported, pool=role, kind=kind)
                  for kind in ("decode", "prefill")}
        replicas = pool.autoscaling.max_replicas
        phase_iterations, phase_busy_s = (
            {phase: total(moved, SPECS[name].exported, pool=role, phase=phase) for phase in PHASES}
            for name in ("glimprouter_engine_iterations", "glimprouter_engine_busy_seconds"))
        figures[role] = {"iterations_per_s": round(iterations / wall_s, 1),
                         "iterations_per_request": round(iterations / requests, 1),
                         "ms_per_iteration": round(1e3 * wall_s * replicas / iterations, 2),
                         "busy_fraction": round(busy_s / (wall_s * replicas), 3),
                         "ms_per_busy_iteration": round(1e3 * busy_s / iterations, 2),
                         "busy_ms_per_request": round(1e3 * busy_s / requests),
                         "decode_tokens_per_iteration": round(tokens["decode"] / iterations, 1),
                         "prefill_tokens_per_s": round(tokens["prefill"] / wall_s),
                         **phase_figures(phase_iterations, phase_busy_s),
                         "prefill_tokens_per_mixed_iteration": round(tokens["prefill"] / phase_iterations["mixed"], 1)
                                                               if phase_iterations["mixed"] else 0.0,
                         "calls": call_figures(moved, role)}
    return figures


def call_figures(moved: dict, role: str) -> dict:
    """A pool's engine requests over a level by call (``deployments.pool.CALLS``): how many ran to their end, and
    the mean milliseconds of each part of one (``deployments.pool.request_times``), with ``outside``: the total
    less queued and running, the way into and out of the engine core."""
    figures = {}
    for call in CALLS:
        if not (requests := total(moved, SPECS["glimprouter_engine_requests"].exported, pool=role, call=call)):
            continue
        ms = {part: round(1e3 * total(moved, SPECS["glimprouter_engine_request_seconds"].exported, pool=role,
                                      call=call, part=part) / requests, 1) for part in REQUEST_PARTS}
        figures[call] = {"requests": round(requests), "ms": {**ms, "outside": round(ms["total"] - ms["queued"]
                                                                                     - ms["running"], 1)}}
    return figures


def phase_figures(iterations: Mapping[str, float], busy_s: Mapping[str, float]) -> dict:
    """From an engine's iterations and busy seconds by phase (see ``deployments.pool.PHASES``): the share of
    mixed iterations and the time per busy iteration of each phase."""
    return {"mixed_fraction": round(iterations["mixed"] / max(sum(iterations.values()), 1), 3),
            "ms_per_busy_iteration_by_phase": {phase: round(1e3 * busy_s[phase] / iterations[phase], 2)
                                               for phase in PHASES if iterations[phase]}}


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
        "concurrency": concurrency, "requests": len(results), "wall_s": round(wall, 2),
        "throughput_rps": round(len(results) / wall, 4), "steady_rps": steady_throughput(results, concurrency),
        "p50_s": round(statistics.median(latency), 2), "p95_s": round(percentile(latency, 0.95), 2),
        "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3),
        "goodput_rps": round(sum(x <= bound_s for x in latency) / wall, 4), "latency_bound_s": bound_s,
        "steps_per_request": round(len(steps) / len(results), 2),
        "large_fraction": round(sum(s["pool"] == "large" for s in steps) / len(steps), 3),
        "step_ms_p50": {p: round(statistics.median(ms), 1) for p in ("small", "large")
                        if (ms := [s["step_ms"] for s in steps if s["pool"] == p])},
        "glimpse_ms_p50": {kind: round(statistics.median(ms), 1) for kind, fused in (("call", False), ("fused", True))
                           if (ms := [s["glimpse_ms"] for s in steps if s["glimpse_fused"] is fused and s["glimpse_ms"]])},
        # beside the engines' own times of their calls (``call_figures``; they also count fused glimpses as
        # glimpses and the large pool's final answers as its calls): the rest is Serve and the replicas
        "call_ms_mean": {call: round(statistics.fmean(ms), 1) for call, ms in (
            ("glimpse", [s["glimpse_ms"] for s in steps if not s["glimpse_fused"] and s["glimpse_ms"]]),
            *((f"{p}_step", [s["step_ms"] for s in steps if s["pool"] == p]) for p in ("small", "large"))) if ms},
        "cache_hit": {p: round(sum(r["usage"]["per_pool"][p]["cached_prompt_tokens"] for r in results) /
                               max(1, sum(r["usage"]["per_pool"][p]["prompt_tokens"] for r in results)), 3)
                      for p in ("small", "large")},
    }


def save(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}", flush=True)


def plot(args) -> None:
    """Throughput (steady dashed) and p95 latency against requests in flight, one line per ``setup`` and arm: the
    files of one setup pooled (several starts), levels at the same number in flight averaged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict]] = {}
    for path in args.files:
        data = json.loads(Path(path).read_text())
        for arm, levels in by_arm(data["levels"]).items():
            curves.setdefault(f"{setup(data)} ({arm})", []).extend(levels)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, curve in curves.items():
        points = by_in_flight(curve)
        x = [n for n, _ in points]
        (line,) = ax1.plot(x, [mean_of(levels, "throughput_rps") for _, levels in points], marker="o", label=label)
        if None not in (steady := [mean_of(levels, "steady_rps") for _, levels in points]):
            ax1.plot(x, steady, marker="x", linestyle="--", color=line.get_color(), label=f"{label}, steady")
        ax2.plot(x, [mean_of(levels, "p95_s") for _, levels in points], marker="o", label=label)
    ax1.set(xlabel="requests in flight", ylabel="requests/s", title="throughput")
    ax2.set(xlabel="requests in flight", ylabel="seconds", title="p95 request latency")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    # one legend for both panels, below them (a line's p95 has its throughput line's colour)
    fig.legend(*ax1.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0), fontsize="small")
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    print(f"wrote {args.out}")


def setup(result: dict) -> str:
    """What a result file ran: its layout, steps a request, MPS and ``--set`` overrides (older files lack the last)."""
    overrides = [f"{path}={value}" for path, value in (result.get("overrides") or {}).items()]
    mps = ["MPS"] if result.get("mps") else []
    return ", ".join([result["layout"], f"{result['steps']} steps", *mps, *overrides])


def by_arm(levels: list[dict]) -> dict[str, list[dict]]:
    """A result file's levels grouped by client arm, in order of first appearance (files without arms: stream)."""
    arms: dict[str, list[dict]] = {}
    for level in levels:
        arms.setdefault(level.get("arm", "stream"), []).append(level)
    return arms


def by_in_flight(curve: list[dict]) -> list[tuple[int, list[dict]]]:
    """A curve's levels grouped by requests in flight, in order (several starts' levels at one number together)."""
    groups: dict[int, list[dict]] = {}
    for level in curve:
        groups.setdefault(level["concurrency"], []).append(level)
    return sorted(groups.items())


def at_equal_p95(curve: list[dict], p95_s: float, key: str) -> float | None:
    """The throughput ``key`` of a curve (levels of one arm, those at the same number in flight averaged) where its
    p95 latency is ``p95_s``: linear between neighbouring points whose p95s enclose it; None outside the curve."""
    points = [(mean_of(levels, "p95_s"), mean_of(levels, key)) for _, levels in by_in_flight(curve)]
    for (p1, t1), (p2, t2) in zip(points, points[1:] or points):  # a one-point curve: only at its own p95
        if min(p1, p2) <= p95_s <= max(p1, p2) and None not in (t1, t2):
            return t1 if p1 == p2 else t1 + (t2 - t1) * (p95_s - p1) / (p2 - p1)
    return None


def mean_of(levels: list[dict], key: str) -> float | None:
    """The mean of ``key`` over ``levels``; None when there are none or one lacks it (older result files)."""
    values = [lv.get(key) for lv in levels]
    return statistics.fmean(values) if values and None not in values else None


def comparisons(routed: dict, baseline: dict) -> list[dict]:
    """Each arm of a routed result file against a baseline file (levels at the same number in flight averaged):
    throughput ratios, over the level and steady, at equal requests in flight and at the baseline's p95."""
    rows = []
    for arm, curve in by_arm(routed["levels"]).items():
        routed_at = dict(by_in_flight(curve))
        for n, base in by_in_flight(baseline["levels"]):
            same = routed_at.get(n, [])
            p95_s = mean_of(base, "p95_s")
            row = {"arm": arm, "in_flight": n, "p95_s": mean_of(same, "p95_s"), "baseline_p95_s": p95_s}
            for key in ("throughput_rps", "steady_rps"):
                if (reference := mean_of(base, key)) is None:
                    continue
                row[f"{key}_ratio"] = None if (equal := mean_of(same, key)) is None else equal / reference
                row[f"{key}_ratio_at_equal_p95"] = None if (at := at_equal_p95(curve, p95_s, key)) is None \
                    else at / reference
            rows.append({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
    return rows


def merged(paths: list[str]) -> dict:
    """Result files of one ``setup`` (e.g. several starts) as one, their levels together."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    if len(setups := {setup(f) for f in files}) > 1:
        raise SystemExit(f"gpu_bench compare: the files ran different setups: {'; '.join(sorted(setups))}")
    return {**files[0], "levels": [level for f in files for level in f["levels"]]}


def compare(args) -> None:
    """Print ``comparisons`` of routed result files against baseline ones, one JSON line each."""
    routed, baseline = merged(args.routed), merged(args.baseline)
    print(f"{setup(routed)} against {setup(baseline)}")
    for row in comparisons(routed, baseline):
        print(json.dumps(row))


def parse_override(text: str) -> tuple[str, object]:
    """``dotted.path=value`` (the value parsed as YAML) as a (path, value) pair."""
    import yaml

    path, sep, value = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected dotted.path=value, got {text!r}")
    return path, yaml.safe_load(value)


def tag(overrides: dict) -> str:
    """A result file's suffix naming its overrides: ``-max_num_batched_tokens512``."""
    return "".join(f"-{path.rsplit('.', 1)[-1]}{value}" for path, value in overrides.items())


def parse_levels(text: str) -> list[tuple[str, int]]:
    """``stream:1,final:64`` -> [("stream", 1), ("final", 64)]."""
    levels = [(arm, int(n)) for arm, n in (item.split(":") for item in text.split(","))]
    if unknown := {arm for arm, _ in levels} - set(ARMS):
        raise argparse.ArgumentTypeError(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("single", "load"):
        p = sub.add_parser(name)
        p.add_argument("--layout", choices=list(LAYOUTS), default="one-gpu")
        p.add_argument("--steps", type=int, default=24, help="steps of 96 tokens per request")
        p.add_argument("--models", type=Path, default=Path("models/bench"), help="where the model folders go")
        p.add_argument("--out", type=Path, default=RESULTS, help="where result files go")
        p.add_argument("--set", type=parse_override, action="append", default=[], metavar="PATH=VALUE",
                       help="override a config field, e.g. pools.large.engine.max_num_batched_tokens=512")
    sub.choices["single"].add_argument("--requests", type=int, default=3)
    sub.choices["load"].add_argument(
        "--levels", type=parse_levels, default=parse_levels("stream:1,stream:32,stream:64"),
        help="comma-separated ARM:IN_FLIGHT, arms: " + ", ".join(ARMS))
    sub.choices["load"].add_argument("--latency-bound", type=float, default=30.0, help="goodput bound (s)")
    sub.choices["load"].add_argument("--rounds", type=int, default=4,
                                     help="requests per slot in a level (more rounds: a longer steady window)")
    sub.choices["load"].add_argument("--mps", action="store_true", help="run the engines under CUDA MPS")
    p = sub.add_parser("plot")
    p.add_argument("files", nargs="+")
    p.add_argument("--out", default=str(RESULTS / "load.png"))
    p = sub.add_parser("compare", help="routed result files against baseline ones (ratios, also at equal p95)")
    p.add_argument("routed", nargs="+", help="routed result files of one setup (several starts pool their levels)")
    p.add_argument("--baseline", nargs="+", required=True, help="baseline result files of one setup")
    args = parser.parse_args()
    if args.command in ("plot", "compare"):
        {"plot": plot, "compare": compare}[args.command](args)
        return
    args.set = dict(args.set)
    build_tokenizer(args.models)
    for name in SHAPES:
        build_model(args.models, name)
    print(FORCED, flush=True)
    try:
        if args.command == "single":
            asyncio.run(single(args))
            return
        with mps_daemon(args.mps):
            asyncio.run(load(args))
    except ConfigError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
