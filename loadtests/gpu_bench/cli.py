"""``python -m loadtests.gpu_bench``: the commands (single, load, plot, compare)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from cluster.config import ConfigError
from cluster.ops.launcher import HEAD_METRICS_PORT
from cluster.ops.operators import delta, scrape
from loadtests.gpu_bench import __doc__ as PACKAGE_DOC
from loadtests.gpu_bench.client import ARMS, METRICS_LAG_S, one_request, warm_up
from loadtests.gpu_bench.layouts import LAYOUTS, layout, parse_override, tag
from loadtests.gpu_bench.report import compare, plot, save
from loadtests.gpu_bench.stats import breakdown, engine_figures, summarize
from loadtests.gpu_bench.system import mps_daemon, start
from loadtests.gpu_models import SHAPES, build_model, build_tokenizer

RESULTS = Path("results/gpu")
FORCED = "routing forced: random weights make every first-token entropy equal; a glimpse still runs before every step"


async def single(args) -> None:
    cfg, nodes = layout(args.layout, args.steps, args.models, args.set)
    base, key = await start(cfg, nodes)
    endpoints = [f"http://127.0.0.1:{HEAD_METRICS_PORT + i}/metrics" for i in range(len(nodes))]
    rows = []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=3600) as client:
        await warm_up(client, cfg)
        for label, fields, n in (("routed", ARMS["stream"], args.requests), ("large_only", ARMS["large"], 1)):
            for i in range(n):
                before = scrape(endpoints)
                result = await one_request(client, cfg.name, i, fields)
                result["final_ms"] = (await client.get(f"/v1/requests/{result['id']}")).json()["final"]["ms"]
                await asyncio.sleep(METRICS_LAG_S)
                row = {"policy": label, **breakdown(result, before, scrape(endpoints))}
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    save(
        args.out,
        f"single-{args.layout}{tag(args.set)}",
        {"layout": args.layout, "overrides": args.set, "steps": args.steps, "note": FORCED, "rows": rows},
    )


async def load(args) -> None:
    cfg, nodes = layout(args.layout, args.steps, args.models, args.set)
    base, key = await start(cfg, nodes)
    endpoints = [f"http://127.0.0.1:{HEAD_METRICS_PORT + i}/metrics" for i in range(len(nodes))]
    result = {
        "layout": args.layout,
        "placement": LAYOUTS[args.layout].placement,
        "mps": args.mps,
        "overrides": args.set,
        "steps": args.steps,
        "note": FORCED,
        "levels": [],
    }
    name = f"load-{args.layout}{'-mps' if args.mps else ''}{tag(args.set)}"
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=3600, limits=limits
    ) as client:
        await warm_up(client, cfg, max(concurrency for _, concurrency in args.levels))
        seen = scrape(endpoints)
        for arm, concurrency in args.levels:
            n = max(2, args.rounds * concurrency)
            gate, t0 = asyncio.Semaphore(concurrency), time.perf_counter()

            async def gated(i: int, gate=gate, t0=t0, first_seed=10_000 * concurrency, fields=ARMS[arm]) -> dict:
                async with gate:
                    start = time.perf_counter() - t0
                    done = await one_request(client, cfg.name, first_seed + i, fields)
                    return {**done, "start_s": start, "end_s": time.perf_counter() - t0}

            results = await asyncio.gather(*(gated(i) for i in range(n)))
            wall = time.perf_counter() - t0
            await asyncio.sleep(METRICS_LAG_S)
            now = scrape(endpoints)
            level = {
                "arm": arm,
                **summarize(concurrency, results, wall, args.latency_bound),
                "engines": engine_figures(cfg, delta(now, seen), wall, len(results)),
            }
            seen = now
            result["levels"].append(level)
            print(json.dumps(level), flush=True)
            save(args.out, name, result)  # after every level: a cut-off run keeps what it measured


def parse_levels(text: str) -> list[tuple[str, int]]:
    """``stream:1,final:64`` -> [("stream", 1), ("final", 64)]."""
    levels = [(arm, int(n)) for arm, n in (item.split(":") for item in text.split(","))]
    if unknown := {arm for arm, _ in levels} - set(ARMS):
        raise argparse.ArgumentTypeError(f"unknown arms {sorted(unknown)}; known: {', '.join(ARMS)}")
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench",
        description=PACKAGE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("single", "load"):
        p = sub.add_parser(name)
        p.add_argument("--layout", choices=list(LAYOUTS), default="one-gpu")
        p.add_argument("--steps", type=int, default=24, help="steps of 96 tokens per request")
        p.add_argument("--models", type=Path, default=Path("models/bench"), help="where the model folders go")
        p.add_argument("--out", type=Path, default=RESULTS, help="where result files go")
        p.add_argument(
            "--set",
            type=parse_override,
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help="override a config field, e.g. pools.large.engine.max_num_batched_tokens=512",
        )
    sub.choices["single"].add_argument("--requests", type=int, default=3)
    sub.choices["load"].add_argument(
        "--levels",
        type=parse_levels,
        default=parse_levels("stream:1,stream:32,stream:64"),
        help="comma-separated ARM:IN_FLIGHT, arms: " + ", ".join(ARMS),
    )
    sub.choices["load"].add_argument("--latency-bound", type=float, default=30.0, help="goodput bound (s)")
    sub.choices["load"].add_argument(
        "--rounds", type=int, default=4, help="requests per slot in a level (more rounds: a longer steady window)"
    )
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
