"""Weighted shares in the simulated cluster of ``loadtests/fairness_sim.py`` (virtual time, no engines): two
tenants of weights 2 and 1, both saturating, through the fair queue; prints each pool's token shares against
the weights' shares, over the whole run and over its last three simulated minutes, and without fair shares
(the dispatchers count tokens but never hold a call back, so the pools' own first-come-first-served queues
decide).

    python -m loadtests.shares_sim [--users 32] [--duration 300] [--weights 2,1]
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

from loadtests.fairness_sim import build, model_options, now, one_request, run_virtual

WINDOW_S = 180.0


UNLIMITED = 100_000


async def simulate(opts, weights: list[float], fair: bool = True) -> dict:
    unlimited = {} if fair else {"max_in_flight_small": UNLIMITED, "max_in_flight_large": UNLIMITED}
    shares, loop, steps = build(opts, True, **unlimited)
    end, ids, marks = now() + opts.duration, iter(range(10**9)), {}
    tenants = [f"tenant-{i}" for i in range(len(weights))]

    async def user(tenant: str, weight: float):
        while now() < end:
            rid = f"{tenant}-{next(ids)}"
            await one_request(loop, shares, rid, tenant, steps, weight=weight)

    async def mark():
        await asyncio.sleep(max(0.0, opts.duration - WINDOW_S))
        marks.update({role: Counter(d.served) for role, d in shares.dispatchers.items()})

    users = [user(t, w) for t, w in zip(tenants, weights, strict=True) for _ in range(opts.users)]
    await asyncio.gather(mark(), *users)
    served = {role: Counter(d.served) for role, d in shares.dispatchers.items()}
    return {"tenants": tenants, "served": served, "window": {role: served[role] - marks[role] for role in served}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32, help="requests in flight per tenant")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds (at least 180)")
    parser.add_argument("--weights", default="2,1")
    model_options(parser)
    opts = parser.parse_args(argv)
    weights = [float(w) for w in opts.weights.split(",")]
    out = run_virtual(simulate(opts, weights))
    fcfs = run_virtual(simulate(opts, weights, fair=False))
    print(
        f"{len(weights)} tenants, weights {opts.weights}, {opts.users} requests in flight each, "
        f"{opts.duration:g} simulated s"
    )
    print(
        f"{'pool':6s}{'tenant':10s}{'weight share':>13s}{'share (all)':>12s}{'share (last 180 s)':>19s}"
        f"{'without fair shares':>21s}"
    )
    for role in ("small", "large"):
        total, window = sum(out["served"][role].values()), sum(out["window"][role].values())
        fcfs_window = sum(fcfs["window"][role].values())
        for tenant, weight in zip(out["tenants"], weights, strict=True):
            print(
                f"{role:6s}{tenant:10s}{weight / sum(weights):13.3f}{out['served'][role][tenant] / total:12.3f}"
                f"{out['window'][role][tenant] / window:19.3f}{fcfs['window'][role][tenant] / fcfs_window:21.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
