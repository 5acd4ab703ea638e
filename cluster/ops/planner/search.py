"""The ``plan`` search on the simulator: the cheapest replica mix and layout that meets a latency target.

A candidate is a *cell*: a few GPUs and the replicas on each (pools split, pools sharing GPUs, data-parallel small
replicas, large only). Calls of one request stay on one replica of each pool (prefix affinity), so copies of a
cell behind a random split of the arrivals are independent: k copies at rate R behave as one at R / k. The
search finds each cell's capacity (the highest Poisson rate, or the most requests in flight, at which its p95
meets the target, by bisection on the simulator) and needs ceil(load / capacity) copies of it; the cheapest in
GPUs wins, and the best large-only cell says what the same load costs without routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cluster.ops.planner.simulator import Hardware, Result, simulate
from cluster.ops.planner.system import Layout, RequestShape, parse_layout, spec_of


def candidate_cells(max_gpus: int = 4, routed: bool = True) -> list[Layout]:
    """Cells of up to ``max_gpus`` GPUs: large only, split (k small GPUs with one or two small replicas each, the
    rest large), shared (a small and a large replica on every GPU) and shared plus large-only GPUs."""
    cells = {spec_of(Layout((("large",),) * g)) for g in (1,)}  # copies of one large GPU are every large-only size
    if routed:
        for g in range(1, max_gpus + 1):
            for k in range(g + 1):
                if k < g:
                    cells.add(spec_of(Layout((("small", "large"),) * k + (("large",),) * (g - k))))
                if 0 < k < g:
                    cells.add(spec_of(Layout((("small",),) * k + (("large",),) * (g - k))))
                    cells.add(spec_of(Layout((("small", "small"),) * k + (("large",),) * (g - k))))
            cells.add(spec_of(Layout((("small", "large"),) * g)))
    return [parse_layout(c) for c in sorted(cells, key=lambda c: (len(parse_layout(c).gpus), c))]


@dataclass(frozen=True)
class Target:
    """What the plan must meet: p95 latency at most ``p95_s`` (and, if set, ``goodput`` of the requests within
    ``bound_s``)."""

    p95_s: float
    goodput: float | None = None
    bound_s: float | None = None


@dataclass
class Cell:
    layout: Layout
    capacity: float  # requests/s (open loop) or requests in flight (closed loop) one copy serves at the target
    at_capacity: Result | None
    copies: int = 0
    gpus: int = 0
    per_copy: Result | None = None

    def as_dict(self) -> dict:
        return {
            "layout": spec_of(self.layout),
            "gpus_per_copy": len(self.layout.gpus),
            "capacity": self.capacity,
            "copies": self.copies,
            "gpus": self.gpus,
            "p95_s": self.per_copy.p95_s if self.per_copy else None,
            "p50_s": self.per_copy.p50_s if self.per_copy else None,
        }


@dataclass
class Plan:
    load: float
    closed: bool
    target: Target
    best: Cell | None
    large_only: Cell | None
    cells: list[Cell] = field(default_factory=list)
    best_routed: Cell | None = None  # the cheapest cell with a small pool

    @property
    def gain(self) -> float | None:
        """The best routed cell's load per GPU over the best large-only cell's (above 1: routing pays)."""
        if self.best_routed is None or self.large_only is None or not self.large_only.capacity:
            return None
        routed, large = self.best_routed, self.large_only
        return (routed.capacity / len(routed.layout.gpus)) / (large.capacity / len(large.layout.gpus))

    @property
    def routing_pays(self) -> bool:
        """Routing pays when the cheapest plan needs fewer GPUs than large only, or as many with more headroom."""
        if self.best is None or self.best.layout.count("small") == 0:
            return False
        if self.large_only is None:
            return True
        return self.best.gpus < self.large_only.gpus or (
            self.best.gpus == self.large_only.gpus and (self.gain or 0) > 1
        )


def meets(result: Result, target: Target) -> bool:
    if result.unfinished > 0.02 * max(1, result.requests) or math.isnan(result.p95_s):
        return False
    if target.goodput is not None and result.within(target.bound_s) < target.goodput:
        return False
    return result.p95_s <= target.p95_s


TRIAL_REQUESTS = 800


def run(
    layout: Layout, shape: RequestShape, load: float, closed: bool, hardware: Hardware, duration_s: float, seed: int = 0
) -> Result:
    """One trial of at least ``TRIAL_REQUESTS`` requests (a p95 of fewer moves by several percent between seeds):
    ``duration_s`` or longer under Poisson arrivals, or four rounds of a closed loop."""
    if closed:
        n = max(1, round(load))
        requests = max(4 * n, TRIAL_REQUESTS // 4)
        return simulate(layout, shape, in_flight=n, requests=requests, hardware=hardware, seed=seed)
    duration = max(duration_s, TRIAL_REQUESTS / load)
    return simulate(layout, shape, rate=load, duration_s=duration, hardware=hardware, seed=seed)


def capacity(
    layout: Layout,
    shape: RequestShape,
    target: Target,
    closed: bool,
    hardware: Hardware,
    duration_s: float = 180.0,
    steps: int = 5,
) -> tuple[float, Result | None]:
    """The highest load one copy of ``layout`` serves within the target (0 if not even the least), by doubling
    then bisection."""
    lo, hi, best = 0.0, 1.0 if closed else 0.25, None
    while True:
        result = run(layout, shape, hi, closed, hardware, duration_s)
        if not meets(result, target):
            break
        lo, best, hi = hi, result, hi * 2
        if hi > 1e5:
            break
    for _ in range(steps):
        mid = (lo + hi) / 2 if not closed else math.floor((lo + hi) / 2)
        if mid <= lo:
            break
        result = run(layout, shape, mid, closed, hardware, duration_s)
        if meets(result, target):
            lo, best = mid, result
        else:
            hi = mid
    if closed and lo == 0:
        result = run(layout, shape, 1, closed, hardware, duration_s)
        return (1.0, result) if meets(result, target) else (0.0, None)
    return lo, best


def plan(
    shape: RequestShape,
    load: float,
    target: Target,
    *,
    closed: bool = False,
    hardware: Hardware | None = None,
    max_cell_gpus: int = 2,
    max_gpus: int | None = None,
    duration_s: float = 180.0,
    cells: list[Layout] | None = None,
) -> Plan:
    """Search the candidate cells for ``load`` (req/s, or requests in flight with ``closed``)."""
    hardware = hardware or Hardware()
    routed_cells = cells if cells is not None else candidate_cells(max_cell_gpus)
    large = parse_layout("l")
    evaluated = []
    for layout in routed_cells if any(spec_of(c) == "l" for c in routed_cells) else [large, *routed_cells]:
        shape_here = shape if layout.count("small") else _large_only(shape)
        cap, at_cap = capacity(layout, shape_here, target, closed, hardware, duration_s)
        cell = Cell(layout, cap, at_cap)
        if cap > 0:
            cell.copies = max(1, math.ceil(round(load / cap, 9)))
            cell.gpus = cell.copies * len(layout.gpus)
            cell.per_copy = run(layout, shape_here, load / cell.copies, closed, hardware, duration_s)
            for _ in range(5):  # the bisection's last step can sit just past the edge of another trial
                if meets(cell.per_copy, target):
                    break
                cell.copies += 1
                cell.gpus = cell.copies * len(layout.gpus)
                cell.per_copy = run(layout, shape_here, load / cell.copies, closed, hardware, duration_s)
        evaluated.append(cell)
    feasible = [c for c in evaluated if c.capacity > 0 and (max_gpus is None or c.gpus <= max_gpus)]

    def key(c):
        return c.gpus, -c.capacity / len(c.layout.gpus)

    best = min(feasible, key=key, default=None)
    large_only = min((c for c in evaluated if not c.layout.count("small") and c.capacity > 0), key=key, default=None)
    routed = min((c for c in feasible if c.layout.count("small")), key=key, default=None)
    return Plan(load, closed, target, best, large_only, evaluated, routed)


def _large_only(shape: RequestShape) -> RequestShape:
    from dataclasses import replace

    return replace(shape, arm="large")


def autoscaling_targets(cell: Cell) -> dict[str, dict]:
    """Each pool's Ray Serve autoscaling settings from the plan's own prediction: replicas at the planned load
    (min_replicas a quarter of it, max_replicas it plus a fifth), and target_ongoing_requests the calls open
    at a replica then (the autoscaler keeps that many per replica, so it holds the plan's operating point)."""
    out = {}
    result = cell.per_copy
    for role in ("small", "large"):
        per_copy = cell.layout.count(role)
        if not per_copy or result is None:
            continue
        replicas = per_copy * cell.copies
        ongoing = result.pools.get(role, {}).get("open_calls_mean", 0.0)
        out[role] = {
            "replicas": replicas,
            "min_replicas": max(1, replicas // 4),
            "max_replicas": max(replicas, math.ceil(replicas * 1.2)),
            "target_ongoing_requests": round(max(1.0, ongoing), 1),
            "busy_fraction": round(result.pools.get(role, {}).get("busy_fraction", 0.0), 2),
        }
    return out
