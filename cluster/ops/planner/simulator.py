"""An iteration-level discrete-event simulator of the whole system: clients, the router's step loop
(router_service/loop.py: glimpse, decide, step, final answer) and every pool replica as a continuous-batching
engine (``engine.py``), replicas sharing GPUs, in a closed loop at N in flight or under Poisson arrivals.

The event core is a ``heapq`` of (time, order, callback): the model has three kinds of events (an engine
iteration ends, a call reaches its engine, a call returns to the router), each request's loop is a Python
generator that yields its next call, and that is all ``simpy`` would add, at several times the cost per event.
Vidur simulates one model's replicas; here two models take turns inside each request, which is the point.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field

from cluster.ops.planner.engine import Engine, EngineRequest
from cluster.ops.planner.overheads import load_overheads
from cluster.ops.planner.profiles import (
    KV_BYTES_PER_TOKEN,
    SHAPES,
    find_profile,
    load_profiles,
    sharing_slowdown,
)
from cluster.ops.planner.system import Layout, Overheads, RequestShape, kv_gib


@dataclass(frozen=True)
class Hardware:
    """The card and the engines' settings the profiles are looked up by."""

    gpu: str = "NVIDIA H200"
    small_graphs: str = "FULL"
    models: dict = field(default_factory=lambda: dict(SHAPES))


@dataclass(eq=False)
class Call:
    pool: str
    kind: str  # glimpse | small | large | final
    prompt_tokens: int
    max_tokens: int
    then_glimpse: int = 0  # fused: after the step, a glimpse on a prompt this much longer, in the same call


@dataclass(eq=False)
class Flight:
    """One request in flight."""

    index: int
    started: float
    loop: Iterator[Call]
    replicas: dict
    done_at: float | None = None


class Simulator:
    """Runs requests of one shape over a layout; ``closed_loop`` and ``open_loop`` return ``Result``."""

    def __init__(
        self,
        layout: Layout,
        shape: RequestShape,
        hardware: Hardware = Hardware(),
        overheads: Overheads | None = None,
        profiles: dict | None = None,
        seed: int = 0,
    ):
        self.layout, self.shape = layout, shape
        self.overheads = overheads if overheads is not None else load_overheads()
        self.rng = random.Random(seed)
        self.now, self._events, self._order = 0.0, [], 0
        profiles = profiles if profiles is not None else load_profiles()
        self.pools: dict[str, list[Engine]] = {"small": [], "large": []}
        self.open_calls: dict[int, int] = {}
        for gpu in layout.gpus:
            on_gpu = []
            for role in gpu:
                model = hardware.models[role]
                graphs = hardware.small_graphs if role == "small" else "default"
                profile = find_profile(profiles, model, hardware.gpu, graphs)
                engine = Engine(
                    role,
                    profile.iteration_ms,
                    self,
                    slowdown=sharing_slowdown(profiles, profile) if len(gpu) > 1 else 1.0,
                    max_num_seqs=profile.max_num_seqs,
                    max_num_batched_tokens=profile.max_num_batched_tokens,
                    kv_tokens=int(kv_gib(role, gpu) * 2**30 / KV_BYTES_PER_TOKEN[model]),
                )
                on_gpu.append(engine)
                self.pools[role].append(engine)
                self.open_calls[id(engine)] = 0
            for engine in on_gpu:
                engine.mates = [e for e in on_gpu if e is not engine]
        self.latencies: list[tuple[float, float]] = []  # (start, end)
        self.call_seconds = {"small": 0.0, "large": 0.0}  # calls' time open at a replica, summed

    # event core
    def at(self, when: float, fn, *args) -> None:
        self._order += 1
        heapq.heappush(self._events, (when, self._order, fn, args))

    def _run(self, until: float = float("inf"), stop=lambda: False) -> None:
        while self._events and not stop():
            when, _, fn, args = heapq.heappop(self._events)
            if when > until:
                heapq.heappush(self._events, (when, 0, fn, args))
                break
            self.now = when
            fn(*args)

    # the router's step loop
    def _loop(self, flight: Flight) -> Iterator[Call]:
        s, rng = self.shape, self.rng
        large, lengths = s.large_steps(rng), s.step_lengths(rng)
        context, fused = s.prompt_tokens, False
        for i in range(s.steps):
            pool = "large" if large[i] else "small"
            if s.glimpses and not fused and not (s.arm == "instep" and pool == "small"):
                yield Call("small", "glimpse", context, 1)
            fuse_next = s.arm == "fused" and pool == "small" and 0 < i < s.steps - 1
            yield Call(pool, pool, context, lengths[i], then_glimpse=lengths[i] + 1 if fuse_next else 0)
            fused = fuse_next
            context += lengths[i] + 1  # the step and its delimiter
        yield Call("small" if not self.pools["large"] else "large", "final", context + 4, s.final_tokens)

    def _start(self, index: int) -> Flight:
        flight = Flight(
            index, self.now, iter(()), {role: self.rng.randrange(len(es)) for role, es in self.pools.items() if es}
        )
        flight.loop = self._loop(flight)
        self.at(self.now + self.overheads.per_request_ms / 2e3, self._advance, flight)
        return flight

    def _advance(self, flight: Flight) -> None:
        call = next(flight.loop, None)
        if call is None:
            for engines in self.pools.values():
                for engine in engines:
                    engine.forget(str(flight.index))
            self.at(self.now + self.overheads.per_request_ms / 2e3, self._finish, flight)
            return
        if call.pool == "small" and not self.pools["small"]:
            raise ValueError(f"layout {self.layout} has no small replica for a {call.kind} call")
        engine = self.pools[call.pool][flight.replicas[call.pool]]
        cost = self.overheads.for_call("glimpse" if call.kind == "glimpse" else call.pool)
        outside = cost.ms(self.open_calls[id(engine)]) / 1e3
        self.open_calls[id(engine)] += 1
        self.call_seconds[engine.role] -= self.now
        self.at(self.now + outside / 2, self._submit, flight, engine, call, outside / 2)

    def _submit(self, flight: Flight, engine: Engine, call: Call, back_s: float) -> None:
        key = str(flight.index)

        def returned(now: float) -> None:
            self.open_calls[id(engine)] -= 1
            self.call_seconds[engine.role] += now
            self.at(now + back_s + self.overheads.per_step_ms / 1e3 * (call.kind != "glimpse"), self._advance, flight)

        def step_done(now: float) -> None:
            if call.then_glimpse:
                engine.submit(EngineRequest(key, call.prompt_tokens + call.then_glimpse, 1, returned))
            else:
                returned(now)

        engine.submit(EngineRequest(key, call.prompt_tokens, call.max_tokens, step_done))

    def _finish(self, flight: Flight) -> None:
        flight.done_at = self.now
        self.latencies.append((flight.started, self.now))
        self.on_finish(flight)

    def on_finish(self, flight: Flight) -> None:  # replaced by the loops below
        pass

    # loads
    def closed_loop(self, in_flight: int, requests: int) -> Result:
        """``in_flight`` slots, each starting its next request when one ends, ``requests`` in all (the
        benchmark's levels: rounds x slots), started together; over the whole level, as the driver measures."""
        started = [0]

        def next_request(_: Flight | None = None) -> None:
            if started[0] < requests:
                started[0] += 1
                self._start(started[0])

        self.on_finish = next_request
        for _ in range(min(in_flight, requests)):
            next_request()
        self._run(stop=lambda: len(self.latencies) >= requests)
        return self._result(self.now, in_flight, 0.0)

    def open_loop(self, rate: float, duration_s: float, warmup_s: float | None = None) -> Result:
        """Poisson arrivals at ``rate`` a second for ``duration_s``; requests that arrive in the first
        ``warmup_s`` (default a tenth) are left out of the latency figures."""
        warmup = duration_s / 10 if warmup_s is None else warmup_s
        t, index = 0.0, 0
        while True:
            t += self.rng.expovariate(rate)
            if t > duration_s:
                break
            index += 1
            self.at(t, self._start, index)
        self._run(until=duration_s * 3)
        return self._result(duration_s, None, warmup, arrivals=index)

    def _result(self, wall: float, in_flight: int | None, warmup: float, arrivals: int | None = None) -> Result:
        kept = [(s, e) for s, e in self.latencies if s >= warmup]
        latency = sorted(e - s for s, e in kept)
        steady = None
        if in_flight and self.latencies:
            first_end = min(e for _, e in self.latencies)
            later = [e - s for s, e in self.latencies if s >= first_end]
            steady = in_flight / statistics.fmean(later) if later else None
        span = wall - warmup if arrivals else wall
        done = len(kept) if arrivals is None else sum(1 for s, e in kept if e <= wall)
        pools = {}
        for role, engines in self.pools.items():
            if not engines:
                continue
            sums = [e.summary(self.now) for e in engines]
            iterations = sum(x["iterations"] for x in sums)
            prompt = sum(x["prompt_tokens"] for x in sums)
            pools[role] = {
                "replicas": len(engines),
                "busy_fraction": sum(x["busy_s"] for x in sums) / (self.now * len(engines)) if self.now else 0.0,
                "iterations_per_request": iterations / max(1, len(self.latencies)),
                "ms_per_busy_iteration": sum(x["busy_s"] for x in sums) * 1e3 / iterations if iterations else 0.0,
                "decode_tokens_per_iteration": sum(e.decode_tokens for e in engines) / iterations
                if iterations
                else 0.0,
                "cache_hit": sum(x["cached_tokens"] for x in sums) / prompt if prompt else 0.0,
                "open_calls_mean": self.call_seconds[role] / (self.now * len(engines)) if self.now else 0.0,
            }
        return Result(
            throughput_rps=done / span if span else 0.0,
            steady_rps=steady,
            p50_s=percentile(latency, 0.5),
            p95_s=percentile(latency, 0.95),
            requests=len(kept),
            pools=pools,
            simulated_s=self.now,
            unfinished=arrivals - len(self.latencies) if arrivals else 0,
            latencies=latency,
        )


def percentile(values: list[float], q: float) -> float:
    """The benchmark driver's nearest-rank percentile of sorted ``values`` (nan for none)."""
    if not values:
        return float("nan")
    return values[max(0, math.ceil(q * len(values)) - 1)]


@dataclass
class Result:
    throughput_rps: float
    steady_rps: float | None
    p50_s: float
    p95_s: float
    requests: int
    pools: dict
    simulated_s: float
    unfinished: int = 0
    latencies: list = field(default_factory=list, repr=False)  # sorted seconds of the requests counted

    def within(self, bound_s: float) -> float:
        """Share of the counted requests that took at most ``bound_s``."""
        return sum(x <= bound_s for x in self.latencies) / len(self.latencies) if self.latencies else 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "latencies"}


def simulate(
    layout: Layout,
    shape: RequestShape,
    *,
    in_flight: int | None = None,
    requests: int | None = None,
    rate: float | None = None,
    duration_s: float = 600.0,
    hardware: Hardware = Hardware(),
    overheads: Overheads | None = None,
    profiles: dict | None = None,
    seed: int = 0,
) -> Result:
    """One prediction: a closed loop at ``in_flight`` (``requests`` in all, default two rounds) or Poisson
    arrivals at ``rate`` for ``duration_s``."""
    sim = Simulator(layout, shape, hardware, overheads, profiles, seed)
    if (in_flight is None) == (rate is None):
        raise ValueError("give in_flight or rate")
    if in_flight is not None:
        return sim.closed_loop(in_flight, requests or 2 * in_flight)
    return sim.open_loop(rate, duration_s)
