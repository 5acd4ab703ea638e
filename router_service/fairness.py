"""Fair shares at the step boundary: which tenant's glimpse or step a saturated pool serves next.

Every request is a chain of calls a few hundred milliseconds long, so the router can reorder the whole load at
each step boundary. ``FairDispatcher`` wraps one pool's client (the same ``PoolClient`` protocol as
``router_service/loop.py``): while the pool has fewer of this replica's calls in flight than its concurrency,
a call goes at once; beyond it, calls wait and are released by class (interactive > standard > batch, a
class's oldest waiting call moving it up one rank every ``class_aging_s``, so a lower class gets turns), then,
within the class, by the tenant's virtual token counter (tokens served / weight, the virtual-token-counter
rule), then in arrival order. A tenant that becomes active is lifted
to the smallest counter of the active tenants (with none active, to the largest counter seen), so an idle
tenant cannot bank credit, nor can a tenant long served alone be held back by what it got then; a waiting
tenant's counter does not grow, so it reaches the front: nobody starves. With ``engine_priority`` each call also
carries its place in that order (class, then counter) as vLLM's request priority, for engines that queue calls.

A call's tenant and class come from its affinity key (the request id): ``TenantRegistry`` holds them while a
request runs here (``RequestService`` registers each run). ``FairShares`` is the replica's whole set: the
registry, one dispatcher per pool, and the bounded queue's admission rule (503 with ``Retry-After`` beyond a
depth, lowest class first; calls of admitted requests always queue, none is dropped).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from cluster import metrics
from cluster.config import PRIORITY_CLASSES, FairnessSettings, PoolRole, PriorityClass
from deployments.protocol import Glimpse, NextGlimpse, Prompt, StepChunk, StepSampling
from router_service.errors import APIError

DEFAULT_CALL_COST = 16.0  # a tenant's first call is charged this much (tokens) until its real cost is known
COST_SMOOTHING = 0.2  # weight of the newest call in a tenant's mean call cost
CLASS_SPAN = 10**12  # engine priorities: a class's calls come before the next class's, whatever the counters


@dataclass(frozen=True)
class RunInfo:
    """Who a running request belongs to, as the dispatchers see it."""

    tenant: str
    weight: float = 1.0
    priority: PriorityClass = "standard"


UNKNOWN = RunInfo(tenant="")  # a call whose request is not registered (direct use of the pools)


class TenantRegistry:
    """The running requests of this replica: request id -> tenant, weight and class. Listeners hear when a
    tenant becomes active (its first running request)."""

    def __init__(self) -> None:
        self._runs: dict[str, RunInfo] = {}
        self._tenants: Counter[str] = Counter()
        self._listeners: list[Callable[[str], None]] = []

    def listen(self, on_active: Callable[[str], None]) -> None:
        """Call ``on_active(tenant)`` when a tenant goes from no running request to one."""
        self._listeners.append(on_active)

    def register(self, request_id: str, info: RunInfo) -> None:
        """A request starts running here (again, when resumed)."""
        if request_id in self._runs:
            self.unregister(request_id)
        first = self._tenants[info.tenant] == 0
        self._runs[request_id] = info
        self._tenants[info.tenant] += 1
        if first:
            for on_active in self._listeners:
                on_active(info.tenant)

    def unregister(self, request_id: str) -> None:
        """The request ended (any way); unknown ids are ignored."""
        info = self._runs.pop(request_id, None)
        if info is not None:
            self._tenants[info.tenant] -= 1
            if self._tenants[info.tenant] <= 0:
                del self._tenants[info.tenant]

    def of(self, request_id: str) -> RunInfo:
        """The request's tenant and class (``UNKNOWN`` when not registered)."""
        return self._runs.get(request_id, UNKNOWN)

    def active_tenants(self) -> set[str]:
        """Tenants with a running request."""
        return set(self._tenants)

    def active_classes(self) -> set[PriorityClass]:
        """Classes with a running request."""
        return {info.priority for info in self._runs.values()}


@dataclass
class _Waiter:
    seq: int
    info: RunInfo
    since: float
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FairDispatcher:
    """One pool's client behind a fair queue (see the module's docstring). ``in_flight`` counts the calls
    running and waiting (what the load-aware tau controller reads as the pool's queue)."""

    def __init__(
        self,
        inner,
        role: PoolRole,
        settings: FairnessSettings,
        registry: TenantRegistry,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.inner, self.role, self.settings, self.registry, self.clock = inner, role, settings, registry, clock
        self.limit = settings.max_in_flight(role)
        self.running = 0
        self.counters: dict[str, float] = {}  # virtual token counters: tokens served / weight
        self.served: Counter[str] = Counter()  # tokens served per tenant (cost units)
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self._mean_cost: dict[str, float] = {}
        self._mean_call_s = 1.0
        registry.listen(self._lift)

    @property
    def queued(self) -> int:
        """Calls waiting for a slot."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Calls running and waiting."""
        return self.running + len(self._waiting)

    def drain_s(self) -> float:
        """About how long the waiting calls take to start (mean call time x waiting / concurrency)."""
        return self._mean_call_s * len(self._waiting) / self.limit

    # ---- the queue ----------------------------------------------------------------------------------------

    def _lift(self, tenant: str) -> None:
        """A tenant becoming active starts no lower than the smallest counter of the others active; with none
        active, no lower than the largest counter seen (what tenants served while it was idle have reached),
        so neither an idle tenant's credit nor a lone tenant's past service decides the order later."""
        others = [self.counters.get(t, 0.0) for t in self.registry.active_tenants() if t != tenant]
        floor = min(others) if others else max(self.counters.values(), default=0.0)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)

    def _rank(self, waiter: _Waiter, now: float) -> int:
        aged = int((now - waiter.since) / self.settings.class_aging_s)
        return max(0, PRIORITY_CLASSES.index(waiter.info.priority) - aged)

    def _next(self) -> _Waiter:
        """The class to serve is that of the best-ranked oldest waiter of each class (aging lets a waiting lower
        class take its turn); within it, the tenant with the smallest counter, then arrival order. Aging never
        reorders a class: an aged call does not pass a same-class call of a tenant with less service."""
        now = self.clock()
        oldest: dict[PriorityClass, _Waiter] = {}
        for waiter in self._waiting:
            oldest.setdefault(waiter.info.priority, waiter)  # the list is in arrival order
        served = min(oldest, key=lambda c: (self._rank(oldest[c], now), oldest[c].seq))
        return min(
            (w for w in self._waiting if w.info.priority == served),
            key=lambda w: (self.counters.get(w.info.tenant, 0.0), w.seq),
        )

    def engine_priority(self, info: RunInfo) -> int:
        """The call's place in the order as vLLM's request priority (lower first): its class, then its tenant's
        counter as it is dispatched, so an engine that queues calls orders them as this queue does."""
        counter = min(int(self.counters.get(info.tenant, 0.0)), CLASS_SPAN - 1)
        return PRIORITY_CLASSES.index(info.priority) * CLASS_SPAN + counter

    def _priority(self, info: RunInfo) -> dict[str, int]:
        """The keyword the inner pool's call takes: the engine priority when passed on, else nothing."""
        return {"priority": self.engine_priority(info)} if self.settings.engine_priority else {}

    async def _acquire(self, info: RunInfo) -> float:
        """Wait for a slot; returns the provisional charge put on the tenant's counter at dispatch."""
        if self.running < self.limit and not self._waiting:
            self.running += 1
        else:
            waiter = _Waiter(next(self._seq), info, self.clock())
            self._waiting.append(waiter)
            self._gauge()
            try:
                await waiter.granted
            except asyncio.CancelledError:
                if waiter.granted.done() and not waiter.granted.cancelled():
                    self._release()  # the slot was handed over as the caller went away: pass it on
                elif waiter in self._waiting:
                    self._waiting.remove(waiter)
                    self._gauge()
                raise
        provisional = self._mean_cost.get(info.tenant, DEFAULT_CALL_COST)
        self.counters[info.tenant] = self.counters.get(info.tenant, 0.0) + provisional / info.weight
        return provisional

    def _release(self) -> None:
        """A call ended: its slot goes to the next waiter, if any."""
        while self._waiting:
            waiter = self._next()
            self._waiting.remove(waiter)
            if not waiter.granted.done():
                waiter.granted.set_result(None)
                self._gauge()
                return
        self.running -= 1
        self._gauge()

    def _settle(self, info: RunInfo, provisional: float, cost: float, seconds: float) -> None:
        """Replace the provisional charge by the call's real cost (tokens) on the tenant's counter."""
        self.counters[info.tenant] = self.counters.get(info.tenant, 0.0) + (cost - provisional) / info.weight
        self.served[info.tenant] += cost
        mean = self._mean_cost.get(info.tenant, cost)
        self._mean_cost[info.tenant] = (1 - COST_SMOOTHING) * mean + COST_SMOOTHING * cost
        self._mean_call_s = (1 - COST_SMOOTHING) * self._mean_call_s + COST_SMOOTHING * seconds

    def _cost(self, output_tokens: int, prompt_tokens: int, cached_tokens: int) -> float:
        return output_tokens + self.settings.prefill_token_cost * max(0, prompt_tokens - cached_tokens)

    def _gauge(self) -> None:
        metrics.set_gauge("glimprouter_fair_queue_depth", len(self._waiting), pool=self.role)

    # ---- the PoolClient protocol --------------------------------------------------------------------------

    async def glimpse(self, prompt: Prompt, top_k: int, affinity_key: str) -> Glimpse:
        """The inner pool's glimpse, once the call's turn comes."""
        info = self.registry.of(affinity_key)
        provisional = await self._acquire(info)
        cost, start = provisional, self.clock()
        try:
            glimpse = await self.inner.glimpse(prompt, top_k, affinity_key, **self._priority(info))
            cost = self._cost(1, glimpse.prompt_tokens, glimpse.cached_tokens)
            return glimpse
        finally:
            self._settle(info, provisional, cost, self.clock() - start)
            self._release()

    async def step(
        self,
        prompt: Prompt,
        sampling: StepSampling,
        stream: bool,
        affinity_key: str,
        next_glimpse: NextGlimpse | None = None,
        glimpse_top_k: int | None = None,
    ) -> AsyncIterator[StepChunk]:
        """The inner pool's step chunks, once the call's turn comes; closing this closes the inner call."""
        info = self.registry.of(affinity_key)
        provisional = await self._acquire(info)
        cost, start, call = 1.0, self.clock(), None  # a call closed before its end has written one token
        try:
            call = self.inner.step(
                prompt,
                sampling,
                stream,
                affinity_key,
                next_glimpse=next_glimpse,
                glimpse_top_k=glimpse_top_k,
                **self._priority(info),
            )
            async for chunk in call:
                if chunk.done:
                    cost = self._cost(chunk.output_tokens, chunk.prompt_tokens, chunk.cached_tokens)
                yield chunk
        finally:
            try:
                if call is not None:
                    await call.aclose()
            finally:
                self._settle(info, provisional, cost, self.clock() - start)
                self._release()


class FairShares:
    """A router replica's fair scheduling: the registry of running requests, a ``FairDispatcher`` per pool
    (when enabled) and the bounded queue's admission rule."""

    def __init__(self, settings: FairnessSettings, clock: Callable[[], float] = time.monotonic):
        self.settings, self.clock = settings, clock
        self.registry = TenantRegistry()
        self.dispatchers: dict[PoolRole, FairDispatcher] = {}
        self.roles: list[PoolRole] = []

    def wrap(self, pools: Mapping[PoolRole, object]) -> Mapping[PoolRole, object]:
        """The pools the step loop should call: behind dispatchers when enabled, else as they are."""
        self.roles = list(pools)
        if not self.settings.enabled:
            return pools
        self.dispatchers = {
            role: FairDispatcher(pool, role, self.settings, self.registry, self.clock) for role, pool in pools.items()
        }
        return dict(self.dispatchers)

    def report_queues(self) -> None:
        """Export each pool's queue depth now: the dispatchers' while fair shares are on (they export again as it
        changes), else 0 (nothing waits at the router)."""
        for role in self.roles:
            waiting = self.dispatchers[role].queued if role in self.dispatchers else 0
            metrics.set_gauge("glimprouter_fair_queue_depth", waiting, pool=role)

    def register(self, request_id: str, tenant: str, weight: float, priority: PriorityClass) -> None:
        """A request starts (or resumes) running here."""
        self.registry.register(request_id, RunInfo(tenant, weight, priority))

    def unregister(self, request_id: str) -> None:
        """The request ended."""
        self.registry.unregister(request_id)

    def queued(self) -> int:
        """Calls waiting, both pools."""
        return sum(d.queued for d in self.dispatchers.values())

    def refusal_depth(self, priority: PriorityClass) -> float:
        """The number of waiting calls at which admission refuses ``priority``."""
        s = self.settings
        share = {"batch": s.refuse_batch_at, "standard": s.refuse_standard_at, "interactive": 1.0}[priority]
        return s.max_queue_depth * share

    def check_admission(self, priority: PriorityClass) -> None:
        """Refuse a new request of class ``priority`` with 503 and ``Retry-After`` while the queue is past its
        class's depth (batch first, interactive last). A no-op when fair queueing is off."""
        if not self.dispatchers:
            return
        queued = self.queued()
        if queued < self.refusal_depth(priority):
            return
        retry_s = max(1, math.ceil(max(d.drain_s() for d in self.dispatchers.values())))
        raise APIError(
            503,
            f"the router is overloaded ({queued} calls waiting); {priority} requests are refused "
            f"until the queue drains: retry after {retry_s} s",
            code="overloaded",
            headers={"Retry-After": str(retry_s)},
        )

    def shares(self, role: PoolRole) -> dict[str, float]:
        """Each tenant's share of the tokens ``role`` served through this replica (empty when off)."""
        served = self.dispatchers[role].served if role in self.dispatchers else {}
        total = sum(served.values())
        return {tenant: n / total for tenant, n in served.items()} if total else {}
