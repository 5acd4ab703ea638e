"""Graceful overload in the simulated cluster of ``loadtests/fairness_sim.py`` (virtual time, no engines):
requests of the three classes arrive at a multiple of the cluster's capacity; admission refuses by class
through the fair queue's depth (``FairShares.check_admission``, 503 with ``Retry-After``); every accepted
request must finish.

    python -m loadtests.overload_sim [--load 3] [--duration 300] [--queue-depth 64]

The capacity is measured first: the requests a second 64 closed-loop users complete in 60 simulated seconds.
Prints, per class, the requests that arrived, were refused (and with a ``Retry-After``), accepted, finished,
and the accepted ones' p50/p95, and the most calls that waited at once. What the model leaves out: Ray, HTTP,
Redis, engine batching; each refusal here would be an HTTP 503 in the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
from collections import Counter, defaultdict

from cluster.config import PRIORITY_CLASSES
from loadtests.fairness_sim import build, model_options, now, one_request, p95, run_virtual
from router_service.errors import APIError


async def capacity(opts, users: int = 64, seconds: float = 60.0) -> float:
    """Requests a second the simulated cluster completes when saturated (closed loop)."""
    shares, loop, steps = build(opts, True)
    end, done, ids = now() + seconds, [0], iter(range(10**9))

    async def user():
        while now() < end:
            await one_request(loop, shares, f"c{next(ids)}", "load", steps)
            done[0] += 1

    await asyncio.gather(*(user() for _ in range(users)))
    return done[0] / seconds


async def overload(opts, rate: float) -> dict:
    shares, loop, steps = build(opts, True, max_queue_depth=opts.queue_depth)
    rng, end, tasks = random.Random(11), now() + opts.duration, []
    counts: dict[str, Counter] = defaultdict(Counter)
    latencies: dict[str, list[float]] = defaultdict(list)
    deepest = 0

    async def accepted(rid: str, cls: str):
        latencies[cls].append(await one_request(loop, shares, rid, f"tenant-{cls}", steps, cls))
        counts[cls]["finished"] += 1

    next_at, i = now(), 0
    while next_at < end:
        await asyncio.sleep(max(0.0, next_at - now()))
        cls = PRIORITY_CLASSES[i % 3]
        counts[cls]["arrived"] += 1
        deepest = max(deepest, shares.queued())
        try:
            shares.check_admission(cls)
        except APIError as exc:
            counts[cls]["refused"] += 1
            counts[cls]["with Retry-After"] += int(exc.status == 503 and int(exc.headers["Retry-After"]) >= 1)
        else:
            counts[cls]["accepted"] += 1
            tasks.append(asyncio.create_task(accepted(f"r{i}", cls)))
        i += 1
        next_at += rng.expovariate(rate)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    failed = sum(isinstance(r, BaseException) for r in results)
    return {"counts": counts, "latencies": latencies, "deepest": deepest, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=float, default=3.0, help="arrival rate as a multiple of the capacity")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds of overload")
    parser.add_argument("--queue-depth", type=int, default=64, help="fairness.max_queue_depth")
    model_options(parser)
    opts = parser.parse_args(argv)
    cap = run_virtual(capacity(opts))
    out = run_virtual(overload(opts, opts.load * cap))
    print(
        f"capacity {cap:.1f} requests/s; arrivals {opts.load:g}x that for {opts.duration:g} s; "
        f"queue depth {opts.queue_depth}; most calls waiting at once {out['deepest']}; accepted requests that "
        f"failed {out['failed']}"
    )
    columns = ["arrived", "refused", "with Retry-After", "accepted", "finished"]
    print(f"{'class':12s}" + "".join(f"{c:>17s}" for c in columns) + f"{'p50 ms':>9s}{'p95 ms':>9s}")
    for cls in PRIORITY_CLASSES:
        c, lat = out["counts"][cls], out["latencies"][cls]
        tail = f"{1000 * statistics.median(lat):9.0f}{1000 * p95(lat):9.0f}" if len(lat) > 1 else f"{'-':>9s}" * 2
        print(f"{cls:12s}" + "".join(f"{c[k]:17d}" for k in columns) + tail)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
