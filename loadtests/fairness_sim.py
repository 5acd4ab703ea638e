"""The fair dispatcher in a simulated cluster (no engines): a quiet tenant alone, then beside a noisy one, with
and without fair shares. It shows what the scheduling rule does, not what a real cluster gives.

    python -m loadtests.fairness_sim [--duration 20] [--quiet-rate 2] [--noisy-concurrency 48]

Both pools are ``SimPool``s: each serves ``slots`` calls at once, first come first served, like an engine's
queue; a step takes ``ms_per_token`` per output token, a glimpse ``glimpse_ms``. Requests run through the real
step loop (``router_service/loop.py``, glimprouter at tau 1.0 on synthetic entropies) and, with fair shares,
through ``router_service/fairness.py`` in front of each pool (concurrency = the pool's slots). The quiet tenant
sends requests on an open-loop schedule; the noisy one keeps ``--noisy-concurrency`` requests in flight, within
its own concurrency limit, several times its fair share. Prints the quiet tenant's p50/p95 in each case.
Time is virtual (``VirtualTimeLoop``: the event loop jumps to its next timer instead of sleeping), so the figures
are the model's, the same on any machine and free of the simulator's own CPU time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import selectors
import statistics
from collections.abc import Callable

from cluster.config import FairnessSettings, PolicySettings, StepSettings
from deployments.protocol import Glimpse, StepChunk
from router_service.fairness import FairShares
from router_service.loop import AnswerDone, LoopRequest, StepDone, StepLoop
from router_service.state import StepRecord


class _VirtualSelector(selectors.SelectSelector):
    """Waits no real time: a wait for the next timer moves the loop's virtual clock to it."""

    def __init__(self, loop: VirtualTimeLoop):
        super().__init__()
        self.loop = loop

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing scheduled")
        self.loop.now += timeout
        return super().select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock (seconds from 0)."""

    def __init__(self):
        self.now = 0.0
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self.now


def now() -> float:
    return asyncio.get_running_loop().time()


class SimPool:
    """``slots`` calls at once, the rest wait in arrival order; steps cost time per token."""

    def __init__(self, slots: int, ms_per_token: float, glimpse_ms: float, seed: int):
        self.slots, self.ms_per_token, self.glimpse_ms = asyncio.Semaphore(slots), ms_per_token, glimpse_ms
        self.rng = random.Random(seed)

    async def glimpse(self, prompt, top_k, affinity_key):
        async with self.slots:
            await asyncio.sleep(self.glimpse_ms / 1000)
        logprobs = [0.0] + [-self.rng.uniform(0.0, 8.0)] * (top_k - 1)
        return Glimpse(1, "x", logprobs, ["x"] * top_k, prompt_tokens=64, cached_tokens=48)

    async def step(self, prompt, sampling, stream, affinity_key, next_glimpse=None, glimpse_top_k=None):
        async with self.slots:
            await asyncio.sleep(sampling.max_tokens * self.ms_per_token / 1000)
        yield StepChunk(
            f"step {self.rng.random()}",
            done=True,
            prompt_tokens=64,
            cached_tokens=48,
            output_tokens=sampling.max_tokens,
            finish_reason="length",
        )


class Renderer:
    def step_prompt(self, messages, steps, delimiter):
        return [len(steps)]

    def final_prompt(self, messages, steps, delimiter):
        return [len(steps), 0]


async def one_request(
    loop: StepLoop,
    shares: FairShares,
    rid: str,
    tenant: str,
    steps: StepSettings,
    priority: str = "standard",
    weight: float = 1.0,
    on_step: Callable[[StepRecord], None] | None = None,
) -> float:
    """Run one request through the step loop (``on_step`` hears each step written); returns its latency
    (virtual seconds)."""
    shares.register(rid, tenant, weight, priority)
    start = now()
    req = LoopRequest(
        rid,
        [{"role": "user", "content": "q"}],
        PolicySettings(tau=1.0),
        steps,
        0.0,
        1.0,
        None,
        False,
        tenant=tenant,
        priority=priority,
    )
    try:
        async with contextlib.aclosing(loop.run(req, [])) as events:
            async for event in events:
                if isinstance(event, StepDone) and on_step is not None:
                    on_step(event.record)
                elif isinstance(event, AnswerDone):
                    break
    finally:
        shares.unregister(rid)
    return now() - start


def build(opts, fair: bool, **fairness) -> tuple[FairShares, StepLoop, StepSettings]:
    """The simulated cluster: fair shares (on or off, more ``FairnessSettings`` fields), the step loop over two
    ``SimPool``s, the requests' step settings."""
    settings = FairnessSettings.model_validate(
        {"enabled": fair, "max_in_flight_small": opts.small_slots, "max_in_flight_large": opts.large_slots, **fairness}
    )
    shares = FairShares(settings, clock=now)
    pools = {
        "small": SimPool(opts.small_slots, opts.ms_per_token / 3, opts.glimpse_ms, 1),
        "large": SimPool(opts.large_slots, opts.ms_per_token, opts.glimpse_ms, 2),
    }
    loop = StepLoop(shares.wrap(pools), {"small": Renderer(), "large": Renderer()})
    steps = StepSettings(
        step_max_tokens=opts.step_tokens, token_budget=opts.step_tokens * opts.steps, final_max_tokens=opts.step_tokens
    )
    return shares, loop, steps


def run_virtual(coro):
    """Run a coroutine on a fresh ``VirtualTimeLoop``."""
    loop = VirtualTimeLoop()
    try:
        result = loop.run_until_complete(coro)
        loop.run_until_complete(loop.shutdown_asyncgens())
        return result
    finally:
        loop.close()


def model_options(parser: argparse.ArgumentParser) -> None:
    """The simulated cluster's options."""
    parser.add_argument("--small-slots", type=int, default=8)
    parser.add_argument("--large-slots", type=int, default=4)
    parser.add_argument("--ms-per-token", type=float, default=1.0, help="large pool; the small one is 3x faster")
    parser.add_argument("--glimpse-ms", type=float, default=5.0)
    parser.add_argument("--step-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)


async def scenario(opts, fair: bool, noisy: bool) -> list[float]:
    """The quiet tenant's latencies, alone or beside the noisy one."""
    shares, loop, steps = build(opts, fair)
    quiet, tasks, ids = [], [], iter(range(10**9))
    end = now() + opts.duration

    async def quiet_user():
        rng, next_at = random.Random(5), now()
        while next_at < end:
            await asyncio.sleep(max(0.0, next_at - now()))
            task = asyncio.create_task(one_request(loop, shares, f"q{next(ids)}", "quiet", steps))
            task.add_done_callback(lambda t: quiet.append(t.result()))
            tasks.append(task)
            next_at += rng.expovariate(opts.quiet_rate)

    async def noisy_user():
        while now() < end:
            await one_request(loop, shares, f"n{next(ids)}", "noisy", steps)

    users = [quiet_user()] + ([noisy_user() for _ in range(opts.noisy_concurrency)] if noisy else [])
    await asyncio.gather(*users)
    await asyncio.gather(*tasks)
    return quiet


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0, help="simulated seconds per case")
    parser.add_argument("--quiet-rate", type=float, default=2.0, help="quiet tenant's requests/s (Poisson)")
    parser.add_argument("--noisy-concurrency", type=int, default=48, help="noisy tenant's requests in flight")
    model_options(parser)
    opts = parser.parse_args(argv)
    cases = {
        "quiet alone": (False, False),
        "beside noisy, first come first served": (False, True),
        "beside noisy, fair shares": (True, True),
    }
    results = {name: run_virtual(scenario(opts, fair, noisy)) for name, (fair, noisy) in cases.items()}
    alone = p95(results["quiet alone"])
    print(f"{'case':40s} {'requests':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'p95 / alone':>11s}")
    for name, latencies in results.items():
        print(
            f"{name:40s} {len(latencies):8d} {1000 * statistics.median(latencies):8.0f} "
            f"{1000 * p95(latencies):8.0f} {p95(latencies) / alone:11.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
