"""Operators' commands on a running cluster: ``status``, ``scale`` and ``calibrate``.

``status`` reads Serve's own view (replicas per deployment, from the Ray dashboard) and the system's
Prometheus metrics (every Ray node's metrics endpoint, scraped twice ``--window`` seconds apart).
``scale`` changes one pool's autoscaling bounds live: it redeploys the running Serve config with only
that deployment's ``autoscaling_config`` changed, which Serve applies without restarting replicas.
``calibrate`` sends prompts through the API with every step on the small pool and a glimpse before each
step, and reports the large-step fraction each tau would give.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

from cluster.config import load_config
from cluster.metrics import SPECS
from cluster.topology import DEPLOYMENT_NAMES

DASHBOARD = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")

# ---- metrics: scrape and read -----------------------------------------------------------------------------

Samples = dict[tuple[str, frozenset], float]  # (name, labels) -> value, summed over nodes


def metrics_endpoints() -> list[str]:
    """Every live Ray node's Prometheus endpoint."""
    import ray

    if not ray.is_initialized():
        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n["Alive"]]


def scrape(endpoints: list[str], extra: tuple[str, ...] = ()) -> Samples:
    """All samples of the system's metrics (``ray_glimprouter_*``) and of the ``extra`` names (e.g. vLLM's),
    summed across nodes and replicas over the labels that are not the metric's own tags (and ``le``)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    keep = {spec.exported: set(spec.tags) | {"le"} for spec in SPECS.values()} | {name: {"le"} for name in extra}
    samples: Samples = defaultdict(float)
    for url in endpoints:
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for s in family.samples:
                base = next((b for b in keep if s.name == b or s.name.startswith(b + "_")), None)
                if base is not None:
                    labels = frozenset((k, v) for k, v in s.labels.items() if k in keep[base])
                    samples[(s.name, labels)] += s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def quantile(samples: Samples, histogram: str, q: float, **labels: str) -> float | None:
    """Quantile ``q`` of a Prometheus histogram (linear inside the bucket, as ``histogram_quantile``)."""
    buckets: dict[float, float] = defaultdict(float)
    want = set(labels.items())
    for (n, lab), v in samples.items():
        if n == f"{histogram}_bucket" and want <= lab:
            buckets[float(dict(lab)["le"])] += v
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    if not counts or counts[-1] == 0:
        return None
    rank = q * counts[-1]
    i = bisect.bisect_left(counts, rank)
    if bounds[i] == math.inf:
        return bounds[i - 1] if i > 0 else None
    lower, below = (bounds[i - 1], counts[i - 1]) if i > 0 else (0.0, 0.0)
    inside = counts[i] - below
    return lower + (bounds[i] - lower) * ((rank - below) / inside if inside else 1.0)


def delta(after: Samples, before: Samples) -> Samples:
    """Counter and histogram increase between two scrapes."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


# ---- status ------------------------------------------------------------------------------------------------


def serve_details() -> dict:
    """Serve's instance details from the Ray dashboard."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(DASHBOARD).get_serve_details()


def pool_status(details: dict, app: str, before: Samples, after: Samples, window_s: float) -> list[dict]:
    """One row per pool: replicas, load, step rate, large fraction, step latency quantiles."""
    deployments = details["applications"][app]["deployments"]
    moved = delta(after, before)
    steps = {pool: total(moved, SPECS["glimprouter_steps"].exported, pool=pool) for pool in DEPLOYMENT_NAMES}
    all_steps = sum(steps.values())
    rows = []
    for pool, name in DEPLOYMENT_NAMES.items():
        dep = deployments[name]
        running = sum(1 for r in dep["replicas"] if r["state"] == "RUNNING")
        latency = SPECS["glimprouter_step_latency_seconds"].exported
        window = moved if total(moved, latency + "_count", pool=pool) else after  # since start when idle
        rows.append(
            {
                "pool": pool,
                "target": dep["target_num_replicas"],
                "running": running,
                "pending": len(dep["replicas"]) - running,
                "bounds": dep["deployment_config"].get("autoscaling_config") or {},
                "ongoing": total(after, SPECS["glimprouter_pool_ongoing_requests"].exported, pool=pool),
                "queue": total(after, SPECS["glimprouter_pool_queue_depth"].exported, pool=pool),
                "steps_per_s": steps[pool] / window_s,
                "step_share": steps[pool] / all_steps if all_steps else None,
                "p50_s": quantile(window, latency, 0.5, pool=pool),
                "p95_s": quantile(window, latency, 0.95, pool=pool),
            }
        )
    return rows


def format_status(rows: list[dict], window_s: float) -> str:
    """The status table."""

    def ms(v):
        return "-" if v is None else f"{v * 1e3:.0f}"

    lines = [
        f"{'pool':6} {'replicas t/r/p':>15} {'min-max':>8} {'ongoing':>8} {'queue':>6} {'steps/s':>8} "
        f"{'step share':>10} {'p50 ms':>7} {'p95 ms':>7}"
    ]
    for r in rows:
        b = r["bounds"]
        share = "-" if r["step_share"] is None else f"{r['step_share']:.0%}"
        lines.append(
            f"{r['pool']:6} {r['target']:>7}/{r['running']}/{r['pending']:<5} "
            f"{str(b.get('min_replicas', '-')) + '-' + str(b.get('max_replicas', '-')):>8} "
            f"{r['ongoing']:>8.0f} {r['queue']:>6.0f} {r['steps_per_s']:>8.2f} {share:>10} "
            f"{ms(r['p50_s']):>7} {ms(r['p95_s']):>7}"
        )
    lines.append(
        f"(rates over the last {window_s:.0f} s; step share of the large pool is the large-step fraction; "
        "latency over the window, or since start when no step ran in it)"
    )
    return "\n".join(lines)


def cmd_status(args) -> int:
    endpoints = metrics_endpoints()
    before = scrape(endpoints)
    time.sleep(args.window)
    after = scrape(endpoints)
    rows = pool_status(serve_details(), args.app, before, after, args.window)
    print(json.dumps(rows, indent=2) if args.json else format_status(rows, args.window))
    return 0


# ---- scale -------------------------------------------------------------------------------------------------


def scaled_config(details: dict, app: str, pool: str, changes: dict) -> dict:
    """The running Serve config with one pool's autoscaling bounds changed (nothing else)."""
    config = copy.deepcopy(
        {
            "proxy_location": details["proxy_location"],
            "http_options": details["http_options"],
            "applications": [a["deployed_app_config"] for a in details["applications"].values()],
        }
    )
    target = next(a for a in config["applications"] if a["name"] == app)
    deployment = next(d for d in target["deployments"] if d["name"] == DEPLOYMENT_NAMES[pool])
    bounds = {**deployment.get("autoscaling_config", {}), **changes}
    if not bounds.get("min_replicas", 1) <= bounds.get("max_replicas", 1):
        raise ValueError(f"min_replicas {bounds['min_replicas']} is above max_replicas {bounds['max_replicas']}")
    deployment["autoscaling_config"] = bounds
    deployment.pop("num_replicas", None)
    return config


def cmd_scale(args) -> int:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    changes = {
        k: v
        for k, v in (
            ("min_replicas", args.min),
            ("max_replicas", args.max),
            ("target_ongoing_requests", args.target_ongoing),
            ("upscale_delay_s", args.upscale_delay),
            ("downscale_delay_s", args.downscale_delay),
        )
        if v is not None
    }
    if not changes:
        print(
            "error: give at least one of --min, --max, --target-ongoing, --upscale-delay, --downscale-delay",
            file=sys.stderr,
        )
        return 2
    details = serve_details()
    try:
        config = scaled_config(details, args.app, args.pool, changes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ServeSubmissionClient(DASHBOARD).deploy_applications(config)
    print(
        f"{DEPLOYMENT_NAMES[args.pool]}: autoscaling {json.dumps(changes)} applied live "
        f"(keep it by setting pools.{args.pool}.autoscaling in your config)"
    )
    return 0


# ---- calibrate ---------------------------------------------------------------------------------------------


def fractions(entropies: list[float], taus: list[float]) -> list[float]:
    """Large-step fraction each tau gives over the sampled first-token entropies (H >= tau goes large)."""
    return [sum(h >= tau for h in entropies) / len(entropies) for tau in taus]


def tau_for_fraction(taus: list[float], fracs: list[float], target: float) -> float:
    """The tau whose fraction is closest to ``target``."""
    return min(zip(taus, fracs, strict=False), key=lambda tf: abs(tf[1] - target))[0]


def sample_entropies(base_url: str, key: str, model: str, prompts: list[str], seed: int) -> list[float]:
    """First-token entropies of every step of ``prompts``, all steps written by the small pool."""
    import httpx

    entropies = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=900) as client:
        for i, prompt in enumerate(prompts):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "policy": "glimprouter",
                "tau": 10.0,
                "seed": seed + i,
            }  # tau above ln(20): every step small, every step glimpsed
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            entropies += [s["entropy"] for s in response.json()["routing"]["steps"]]
            print(f"[calibrate] {i + 1}/{len(prompts)} prompts, {len(entropies)} steps", file=sys.stderr, flush=True)
    return entropies


def cmd_calibrate(args) -> int:
    from cluster.ops.problems import problems

    cfg = load_config(args.config)
    key = args.key or os.environ.get("GLIMP_API_KEY") or (Path("run") / "demo.key").read_text().strip()
    base = args.url or f"http://{cfg.router.host}:{cfg.router.port}"
    entropies = sample_entropies(base, key, cfg.name, problems(args.prompts), args.seed)
    taus = [round(0.1 * i, 2) for i in range(0, 31)]
    fracs = fractions(entropies, taus)
    print(f"{'tau':>5} {'large fraction':>15}")
    for tau, f in zip(taus, fracs, strict=False):
        print(f"{tau:>5.2f} {f:>15.1%}")
    print(
        f"tau {tau_for_fraction(taus, fracs, args.target):.2f} gives the fraction closest to {args.target:.0%} "
        f"({len(entropies)} steps of {args.prompts} prompts; the paper advises 20-30%)"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"taus": taus, "large_fraction": fracs, "steps": len(entropies)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``status``, ``scale`` and ``calibrate`` to ``python -m cluster``."""
    app = os.environ.get("GLIMP_APP", "glimprouter")
    p = subparsers.add_parser("status", help="per-pool replicas, load, step rate, large fraction, latency")
    p.add_argument("--app", default=app)
    p.add_argument("--window", type=float, default=5.0, help="seconds between the two metric scrapes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = subparsers.add_parser("scale", help="change one pool's autoscaling bounds live")
    p.add_argument("pool", choices=sorted(DEPLOYMENT_NAMES))
    p.add_argument("--app", default=app)
    p.add_argument("--min", type=int, help="min_replicas")
    p.add_argument("--max", type=int, help="max_replicas")
    p.add_argument("--target-ongoing", type=float, help="target_ongoing_requests per replica")
    p.add_argument("--upscale-delay", type=float, help="upscale_delay_s")
    p.add_argument("--downscale-delay", type=float, help="downscale_delay_s")
    p.set_defaults(func=cmd_scale)
    p = subparsers.add_parser("calibrate", help="large-step fraction for each tau, from real glimpses")
    p.add_argument("--config", default=os.environ.get("GLIMP_CONFIG", "local"))
    p.add_argument("--url", help="API base URL (default: the config's router host and port)")
    p.add_argument("--key", help="API key (default: $GLIMP_API_KEY, else the demo tenant's)")
    p.add_argument("--prompts", type=int, default=8, help="how many bundled problems to run")
    p.add_argument("--target", type=float, default=0.25, help="large-step fraction to pick tau for")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the table as JSON (input of `cluster plan --calibration`)")
    p.set_defaults(func=cmd_calibrate)
