"""Priority classes under saturation in the simulated cluster of ``loadtests/fairness_sim.py`` (virtual time, no
engines): an interactive and a batch tenant, equally heavy, through the fair queue and the load-aware tau
controller. Prints each class's p50/p95, its share of large steps, and when each class's tau offset first rose.

    python -m loadtests.classes_sim [--users 24] [--duration 300]

Each tenant keeps ``--users`` requests in flight (closed loop), glimprouter at tau 1.0 on synthetic entropies.
The tau controller (``router_service/tau_control.py``) samples the large pool's calls running and waiting every
``--interval`` seconds against ``--queue-high`` / ``--queue-low``; each rise is 0.25 nats, up to 2.0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
from collections import defaultdict

from cluster.config import TauControllerSettings
from loadtests.fairness_sim import build, model_options, now, one_request, p95, run_virtual
from router_service.tau_control import TauController

CLASSES = ("interactive", "batch")


async def simulate(opts) -> dict:
    shares, loop, steps = build(opts, True)
    control = TauController(
        TauControllerSettings(
            enabled=True, queue_high=opts.queue_high, queue_low=opts.queue_low, interval_s=opts.interval
        )
    )
    loop.tau_controller = control
    end, ids = now() + opts.duration, iter(range(10**9))
    latencies, pools, first_rise = defaultdict(list), defaultdict(list), {}

    async def user(cls: str):
        while now() < end:
            rid, record_pool = f"{cls}-{next(ids)}", lambda record: pools[cls].append(record.pool)
            latency = await one_request(loop, shares, rid, f"tenant-{cls}", steps, cls, on_step=record_pool)
            latencies[cls].append(latency)

    async def controller():
        while now() < end:
            await asyncio.sleep(control.settings.interval_s)
            control.update(loop.pools["large"].in_flight, shares.registry.active_classes())
            for cls in CLASSES:
                if control.offsets[cls] > 0 and cls not in first_rise:
                    first_rise[cls] = now()

    await asyncio.gather(controller(), *(user(cls) for cls in CLASSES for _ in range(opts.users)))
    return {"latencies": latencies, "pools": pools, "first_rise": first_rise, "offsets": dict(control.offsets)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=24, help="requests in flight per tenant")
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds")
    parser.add_argument("--queue-high", type=int, default=8)
    parser.add_argument("--queue-low", type=int, default=2)
    parser.add_argument("--interval", type=float, default=1.0)
    model_options(parser)
    opts = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the controller logs every change
    out = run_virtual(simulate(opts))
    print(
        f"{opts.users} requests in flight per class for {opts.duration:g} simulated s; final tau offsets "
        + ", ".join(f"{c} {v:.2f}" for c, v in out["offsets"].items())
    )
    print(f"{'class':12s}{'requests':>9s}{'p50 ms':>9s}{'p95 ms':>9s}{'large steps':>12s}{'tau first rose at':>19s}")
    for cls in CLASSES:
        lat, steps = out["latencies"][cls], out["pools"][cls]
        rose = out["first_rise"].get(cls)
        rose_text = "never" if rose is None else f"{rose:.0f} s"
        print(
            f"{cls:12s}{len(lat):9d}{1000 * statistics.median(lat):9.0f}{1000 * p95(lat):9.0f}"
            f"{sum(p == 'large' for p in steps) / len(steps):12.3f}{rose_text:>19s}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
