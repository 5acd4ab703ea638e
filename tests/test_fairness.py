"""The fair dispatcher over gated fake pools: the order a saturated pool serves tenants in, weighted shares,
no banked credit, classes (with aging), cancelled waiters, and the bounded queue's refusals."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from cluster.config import FairnessSettings
from deployments.protocol import Glimpse, StepChunk, StepSampling
from router_service.errors import APIError
from router_service.fairness import FairShares, RunInfo, TenantRegistry

SAMPLING = StepSampling(max_tokens=8, temperature=0.0, top_p=1.0, stop=["\n\n"])


class GatedPool:
    """A pool whose calls wait until the test opens them; records the order calls start in (by key)."""

    def __init__(self, tokens: int = 10):
        self.tokens, self.started, self.gates, self.closed = tokens, [], [], []

    async def _gate(self, key: str) -> None:
        gate = asyncio.Event()
        self.started.append(key)
        self.gates.append(gate)
        await gate.wait()

    async def glimpse(self, prompt, top_k, affinity_key):
        await self._gate(affinity_key)
        return Glimpse(1, "x", [0.0] * top_k, ["x"] * top_k, prompt_tokens=10, cached_tokens=10)

    async def step(self, prompt, sampling, stream, affinity_key, next_glimpse=None, glimpse_top_k=None):
        try:
            yield StepChunk("first")
            await self._gate(affinity_key)
            yield StepChunk("text", done=True, prompt_tokens=10, cached_tokens=10, output_tokens=self.tokens)
        except GeneratorExit:
            self.closed.append(affinity_key)
            raise

    def open_next(self) -> None:
        self.gates.pop(0).set()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def settings(**over) -> FairnessSettings:
    return FairnessSettings(**{"enabled": True, "max_in_flight_small": 1, "max_in_flight_large": 1, **over})


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def run_step(pool, key: str) -> None:
    async for _ in pool.step([1], SAMPLING, False, key):
        pass


def registered(shares: FairShares, *runs: tuple[str, str, float, str]) -> None:
    for rid, tenant, weight, priority in runs:
        shares.register(rid, tenant, weight, priority)


async def test_a_saturated_pool_serves_the_tenant_with_the_least_service_first():
    inner, shares = GatedPool(), FairShares(settings(), clock=Clock())
    pool = shares.wrap({"large": inner})["large"]
    registered(
        shares,
        ("a1", "noisy", 1, "standard"),
        ("a2", "noisy", 1, "standard"),
        ("a3", "noisy", 1, "standard"),
        ("b1", "quiet", 1, "standard"),
    )
    tasks = [asyncio.create_task(run_step(pool, key)) for key in ("a1", "a2", "a3")]
    await settle()
    tasks.append(asyncio.create_task(run_step(pool, "b1")))  # the quiet tenant arrives last
    await settle()
    assert inner.started == ["a1"] and pool.queued == 3 and pool.in_flight == 4
    for _ in range(4):
        inner.open_next()
        await settle()
    await asyncio.gather(*tasks)
    assert inner.started == ["a1", "b1", "a2", "a3"]  # first come, first served would give a1 a2 a3 b1
    assert pool.running == 0 and pool.queued == 0


async def simulate(shares: FairShares, pool, inner: GatedPool, keys: list[str], calls: int) -> None:
    """Each key sends step after step (always backlogged); the pool serves ``calls`` calls one at a time."""
    stop = asyncio.Event()

    async def user(key: str):
        while not stop.is_set():
            await run_step(pool, key)

    tasks = [asyncio.create_task(user(key)) for key in keys]
    await settle()
    for _ in range(calls):
        inner.open_next()
        await settle()
    stop.set()
    while inner.gates:
        inner.open_next()
        await settle()
    await asyncio.gather(*tasks)


async def test_backlogged_tenants_share_the_pool_by_weight():
    inner, shares = GatedPool(tokens=10), FairShares(settings(), clock=Clock())
    pool = shares.wrap({"large": inner})["large"]
    # the heavy tenant runs 8 requests at once, the light one 2; weights 3 and 1
    keys = [f"h{i}" for i in range(8)] + ["l0", "l1"]
    registered(shares, *((k, "heavy" if k[0] == "h" else "light", 3 if k[0] == "h" else 1, "standard") for k in keys))
    await simulate(shares, pool, inner, keys, calls=400)
    share = shares.shares("large")
    assert share["heavy"] == pytest.approx(0.75, abs=0.075) and share["light"] == pytest.approx(0.25, abs=0.025)


async def test_an_idle_tenant_cannot_bank_credit():
    inner, shares = GatedPool(tokens=10), FairShares(settings(), clock=Clock())
    pool = shares.wrap({"large": inner})["large"]
    registered(shares, ("a1", "alone", 1, "standard"))
    await simulate(shares, pool, inner, ["a1"], calls=50)  # served alone: its counter grows by 10 a call
    assert pool.counters["alone"] == pytest.approx(pool.served["alone"]) and pool.served["alone"] >= 500
    registered(shares, ("b1", "late", 1, "standard"))  # arrives after idling: lifted to the active minimum
    assert pool.counters["late"] == pytest.approx(pool.counters["alone"])
    before = dict(pool.served)
    await simulate(shares, pool, inner, ["a1", "b1"], calls=40)
    got = {t: pool.served[t] - before.get(t, 0) for t in ("alone", "late")}
    assert abs(got["alone"] - got["late"]) <= 20  # they alternate: the late tenant did not take 50 calls in a row


async def test_a_tenant_served_alone_is_not_held_back_by_a_newcomer_that_arrived_while_it_was_idle():
    """The noisy neighbour measured on the CPU cluster: the quiet tenant was served alone for minutes, then the
    noisy one arrived between two of its requests; the newcomer, lifted to nothing, took every call."""
    inner, shares = GatedPool(tokens=10), FairShares(settings(), clock=Clock())
    pool = shares.wrap({"large": inner})["large"]
    registered(shares, ("q0", "quiet", 1, "standard"))
    await simulate(shares, pool, inner, ["q0"], calls=50)  # the quiet tenant alone: its counter reaches 500
    shares.unregister("q0")  # between two of its requests
    registered(shares, *((f"n{i}", "noisy", 1, "standard") for i in range(4)))  # the newcomer arrives
    assert pool.counters.get("noisy", 0.0) == pytest.approx(pool.counters["quiet"])
    registered(shares, ("q1", "quiet", 1, "standard"))
    before = dict(pool.served)
    await simulate(shares, pool, inner, ["n0", "n1", "n2", "n3", "q1"], calls=40)
    got = {t: pool.served[t] - before.get(t, 0) for t in ("quiet", "noisy")}
    # they alternate (the noisy tenant's four requests also drain at the end): the quiet tenant is not starved
    assert got["quiet"] >= 200 and abs(got["quiet"] - got["noisy"]) <= 40


async def test_a_higher_class_goes_first_and_a_waiting_lower_class_ages_up():
    clock = Clock()
    inner, shares = GatedPool(), FairShares(settings(class_aging_s=1.0), clock=clock)
    pool = shares.wrap({"large": inner})["large"]
    registered(
        shares,
        ("x", "t0", 1, "standard"),
        ("b", "t1", 1, "batch"),
        ("s", "t2", 1, "standard"),
        ("i", "t3", 1, "interactive"),
    )
    first = asyncio.create_task(run_step(pool, "x"))
    await settle()
    batch = asyncio.create_task(run_step(pool, "b"))
    await settle()
    clock.now = 1.5  # the batch call has waited 1.5 aging periods: it ranks as standard now
    later = [asyncio.create_task(run_step(pool, key)) for key in ("s", "i")]
    await settle()
    for _ in range(4):
        inner.open_next()
        await settle()
    await asyncio.gather(first, batch, *later)
    assert inner.started == ["x", "i", "b", "s"]  # interactive first; the aged batch call before the later standard


async def test_aging_never_lets_a_call_pass_a_same_class_call_of_a_tenant_with_less_service():
    """Calls that waited many aging periods still yield, within their class, to a tenant served less."""
    clock = Clock()
    inner, shares = GatedPool(), FairShares(settings(class_aging_s=1.0), clock=clock)
    pool = shares.wrap({"large": inner})["large"]
    registered(shares, *((f"n{i}", "noisy", 1, "standard") for i in range(4)), ("q", "quiet", 1, "standard"))
    tasks = [asyncio.create_task(run_step(pool, f"n{i}")) for i in range(4)]
    await settle()
    clock.now = 10.0  # the noisy tenant's waiting calls have aged ten periods
    tasks.append(asyncio.create_task(run_step(pool, "q")))
    await settle()
    for _ in range(5):
        inner.open_next()
        await settle()
    await asyncio.gather(*tasks)
    assert inner.started == ["n0", "q", "n1", "n2", "n3"]


async def test_a_cancelled_waiter_leaves_the_queue_and_a_closed_step_closes_the_inner_call():
    inner, shares = GatedPool(), FairShares(settings(), clock=Clock())
    pool = shares.wrap({"small": inner})["small"]
    running = asyncio.create_task(run_step(pool, "r1"))
    await settle()
    waiting = asyncio.create_task(run_step(pool, "r2"))
    await settle()
    assert pool.queued == 1
    waiting.cancel()
    await settle()
    assert pool.queued == 0 and waiting.cancelled()
    inner.open_next()
    await running
    assert pool.running == 0

    call = pool.step([1], SAMPLING, True, "r3")
    assert (await anext(call)).text == "first"
    await call.aclose()  # the loop closes a glimpse-in-step call after its first token
    assert inner.closed == ["r3"] and pool.running == 0


async def test_glimpses_queue_like_steps():
    inner, shares = GatedPool(), FairShares(settings(), clock=Clock())
    pool = shares.wrap({"small": inner})["small"]
    registered(shares, ("a", "t1", 1, "batch"), ("b", "t2", 1, "interactive"), ("c", "t3", 1, "standard"))
    tasks = [asyncio.create_task(pool.glimpse([1], 20, key)) for key in ("a", "c", "b")]
    await settle()
    for _ in range(3):
        inner.open_next()
        await settle()
    await asyncio.gather(*tasks)
    assert inner.started == ["a", "b", "c"]


async def test_the_bounded_queue_refuses_the_lowest_class_first_and_never_drops_an_admitted_call():
    inner = GatedPool()
    shares = FairShares(settings(max_queue_depth=4, refuse_batch_at=0.5, refuse_standard_at=0.75), clock=Clock())
    pool = shares.wrap({"small": GatedPool(), "large": inner})["large"]
    tasks = [asyncio.create_task(run_step(pool, f"r{i}")) for i in range(3)]  # one runs, two wait
    await settle()
    assert shares.queued() == 2
    with pytest.raises(APIError) as info:
        shares.check_admission("batch")
    assert (info.value.status, info.value.code) == (503, "overloaded")
    assert int(info.value.headers["Retry-After"]) >= 1
    shares.check_admission("standard")  # 2 < 3 waiting: still admitted
    tasks.append(asyncio.create_task(run_step(pool, "r3")))  # an admitted request's call queues past any depth
    tasks.append(asyncio.create_task(run_step(pool, "r4")))
    await settle()
    with pytest.raises(APIError):
        shares.check_admission("standard")
    with pytest.raises(APIError):
        shares.check_admission("interactive")
    for _ in range(5):
        inner.open_next()
        await settle()
    await asyncio.gather(*tasks)
    assert sorted(inner.started) == [f"r{i}" for i in range(5)]  # every call ran
    shares.check_admission("batch")


def test_off_by_default_the_pools_are_not_wrapped_and_nothing_is_refused():
    shares = FairShares(FairnessSettings())
    pools = {"small": object(), "large": object()}
    assert shares.wrap(pools) is pools
    shares.check_admission("batch")


def test_refusal_depths_are_ordered_by_class():
    with pytest.raises(ValueError, match="refuse_batch_at"):
        FairnessSettings(refuse_batch_at=0.9, refuse_standard_at=0.5)
    shares = FairShares(settings(max_queue_depth=100))
    assert shares.refusal_depth("batch") < shares.refusal_depth("standard") < shares.refusal_depth("interactive")


def test_registry_tracks_active_tenants_and_classes():
    registry, heard = TenantRegistry(), []
    registry.listen(heard.append)
    registry.register("r1", RunInfo("acme", 1.0, "batch"))
    registry.register("r2", registry.of("r1"))
    assert heard == ["acme"] and registry.active_classes() == {"batch"}
    registry.unregister("r1")
    assert registry.active_tenants() == {"acme"}
    registry.unregister("r2")
    registry.unregister("unknown")
    assert registry.active_tenants() == set() and registry.of("r1").tenant == ""


def sim_options(**scenario) -> argparse.Namespace:
    """The simulated cluster's defaults (``loadtests/fairness_sim.py``'s ``model_options``) and a scenario's."""
    from loadtests import fairness_sim

    parser = argparse.ArgumentParser()
    fairness_sim.model_options(parser)
    return argparse.Namespace(**vars(parser.parse_args([])), **scenario)


def test_in_the_simulated_cluster_fair_shares_keep_the_quiet_tenant_near_its_latency_alone():
    from loadtests import fairness_sim

    opts = sim_options(duration=30.0, quiet_rate=2.0, noisy_concurrency=48)

    def p95_of(fair: bool, noisy: bool) -> float:
        return fairness_sim.p95(fairness_sim.run_virtual(fairness_sim.scenario(opts, fair, noisy)))

    alone = p95_of(False, False)
    assert p95_of(True, True) / alone < 1.6
    assert p95_of(False, True) / alone > 3.0


def test_in_the_simulated_cluster_overload_refuses_lowest_class_first_and_loses_no_accepted_request():
    from loadtests import fairness_sim, overload_sim

    opts = sim_options(duration=20.0, queue_depth=64)
    cap = fairness_sim.run_virtual(overload_sim.capacity(opts, seconds=20.0))
    out = fairness_sim.run_virtual(overload_sim.overload(opts, 3 * cap))
    counts = out["counts"]
    assert out["failed"] == 0
    refused = {}
    for cls in ("interactive", "standard", "batch"):
        c = counts[cls]
        assert c["accepted"] == c["finished"] and c["accepted"] + c["refused"] == c["arrived"]
        assert c["refused"] == c["with Retry-After"]
        refused[cls] = c["refused"] / c["arrived"]
    assert refused["interactive"] < refused["standard"] <= refused["batch"]


def test_in_the_simulated_cluster_the_batch_class_tau_rises_first_and_interactive_is_served_first():
    from loadtests import classes_sim, fairness_sim

    opts = sim_options(users=24, duration=20.0, queue_high=8, queue_low=2, interval=1.0)
    out = fairness_sim.run_virtual(classes_sim.simulate(opts))
    assert out["first_rise"]["batch"] < out["first_rise"].get("interactive", float("inf"))
    assert fairness_sim.p95(out["latencies"]["interactive"]) < fairness_sim.p95(out["latencies"]["batch"])


class PriorityPool(GatedPool):
    """A gated pool that also records the engine priority each call was given (None: none passed)."""

    def __init__(self):
        super().__init__()
        self.priorities: dict[str, int | None] = {}

    async def glimpse(self, prompt, top_k, affinity_key, priority=None):
        self.priorities[affinity_key] = priority
        return await super().glimpse(prompt, top_k, affinity_key)

    async def step(self, prompt, sampling, stream, affinity_key, next_glimpse=None, glimpse_top_k=None, priority=None):
        self.priorities[affinity_key] = priority
        async for chunk in super().step(prompt, sampling, stream, affinity_key, next_glimpse, glimpse_top_k):
            yield chunk


async def test_engine_priority_passes_the_queues_order_class_first_then_the_counter():
    inner = PriorityPool()
    shares = FairShares(settings(engine_priority=True, max_in_flight_large=8), clock=Clock())
    pool = shares.wrap({"large": inner})["large"]
    registered(
        shares,
        ("served", "busy", 1, "standard"),
        ("fresh", "idle", 1, "standard"),
        ("batch", "idle", 1, "batch"),
        ("inter", "busy", 1, "interactive"),
    )
    pool.counters.update(busy=500.0, idle=100.0)
    tasks = [asyncio.create_task(run_step(pool, key)) for key in ("served", "fresh", "batch", "inter")]
    await settle()
    p = inner.priorities
    assert p["inter"] < p["fresh"] < p["served"] < p["batch"]  # class first; within standard, less service first
    for _ in range(4):
        inner.open_next()
        await settle()
    await asyncio.gather(*tasks)
    glimpse = asyncio.create_task(pool.glimpse([1], 2, "fresh"))
    await settle()
    inner.open_next()
    await glimpse
    assert inner.priorities["fresh"] is not None  # glimpses carry it too


async def test_without_engine_priority_the_pool_is_given_none():
    inner = PriorityPool()
    shares = FairShares(settings(max_in_flight_large=8), clock=Clock())
    pool = shares.wrap({"large": inner})["large"]
    registered(shares, ("a", "t", 1, "standard"))
    task = asyncio.create_task(run_step(pool, "a"))
    await settle()
    inner.open_next()
    await task
    assert inner.priorities == {"a": None}
