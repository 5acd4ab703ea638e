"""Every metric name of the system, and the Ray metric objects that export them.

Router and pool replicas record through ``ray.util.metrics``; each Ray node's metrics agent serves them
in Prometheus format on its metrics export port, prefixed ``ray_`` (Ray's own convention, like Serve's
``ray_serve_*``). The pools also export vLLM's own engine metrics (``ray_vllm_*``). The operators' CLI
(``cluster status``) and the Grafana dashboard read the names from here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300]
REDIS_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1]
ENTROPY_BUCKETS_NATS = [0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0]
# Ray's metrics agent drops a gauge series not set again within two report intervals (10 s each by default), so
# every process that owns gauges sets each one again this often (see ``keep_gauges_exported``).
GAUGE_REFRESH_S = 5.0


@dataclass(frozen=True)
class MetricSpec:
    """One metric: Ray name (exported as ``ray_<name>``), kind, description, tag keys, buckets."""

    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus scrapes: Ray prefixes ``ray_`` and exports counters as ``<name>_total``
        (histograms add ``_bucket``, ``_sum`` and ``_count`` to this)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


SPECS = {
    s.name: s
    for s in [
        MetricSpec(
            "glimprouter_requests",
            "counter",
            "Requests finished, by tenant, policy and outcome.",
            ("tenant", "policy", "outcome"),
        ),
        MetricSpec(
            "glimprouter_request_latency_seconds",
            "histogram",
            "Whole-request latency.",
            ("policy",),
            tuple(LATENCY_BUCKETS_S),
        ),
        MetricSpec(
            "glimprouter_request_ttft_seconds",
            "histogram",
            "Time from a request's admission to its first output: its first token when streamed, else its "
            "first complete step.",
            ("stream",),
            tuple(LATENCY_BUCKETS_S),
        ),
        MetricSpec(
            "glimprouter_rejections",
            "counter",
            "Requests refused by a tenant's limit (429), by tenant and limit (requests, tokens, concurrency).",
            ("tenant", "reason"),
        ),
        MetricSpec("glimprouter_steps", "counter", "Reasoning steps written, by pool and tenant.", ("pool", "tenant")),
        MetricSpec("glimprouter_glimpses", "counter", "Glimpses (first-token calls to the small pool).", ("tenant",)),
        MetricSpec(
            "glimprouter_tokens", "counter", "Engine-reported output tokens by tenant and pool.", ("tenant", "pool")
        ),
        MetricSpec(
            "glimprouter_prefill_tokens",
            "counter",
            "Engine-reported prompt tokens prefilled (not in the prefix cache), by tenant and pool: with the output "
            "tokens, what a tenant's fair-share counter is charged.",
            ("tenant", "pool"),
        ),
        MetricSpec(
            "glimprouter_first_token_entropy_nats",
            "histogram",
            "First-token entropy of each glimpse.",
            (),
            tuple(ENTROPY_BUCKETS_NATS),
        ),
        MetricSpec(
            "glimprouter_large_step_fraction",
            "gauge",
            "Fraction of this router replica's last 200 steps written by the large pool.",
            (),
        ),
        MetricSpec(
            "glimprouter_glimpse_latency_seconds",
            "histogram",
            "Glimpse latency seen by the router.",
            (),
            tuple(LATENCY_BUCKETS_S),
        ),
        MetricSpec(
            "glimprouter_step_latency_seconds",
            "histogram",
            "Step latency seen by the router, by pool.",
            ("pool",),
            tuple(LATENCY_BUCKETS_S),
        ),
        MetricSpec(
            "glimprouter_redis_latency_seconds",
            "histogram",
            "Latency of the router's Redis round trips.",
            ("op",),
            tuple(REDIS_BUCKETS_S),
        ),
        MetricSpec(
            "glimprouter_pool_retries", "counter", "Pool calls sent again because their replica died.", ("pool",)
        ),
        MetricSpec(
            "glimprouter_pool_ongoing_requests", "gauge", "Calls in a pool replica (glimpses and steps).", ("pool",)
        ),
        MetricSpec(
            "glimprouter_pool_queue_depth", "gauge", "Requests waiting in a pool replica's engine scheduler.", ("pool",)
        ),
        MetricSpec(
            "glimprouter_engine_iterations",
            "counter",
            "Iterations (engine steps) of a pool replica's vLLM scheduler, by phase (mixed: computed prefill).",
            ("pool", "phase"),
        ),
        MetricSpec(
            "glimprouter_engine_busy_seconds",
            "counter",
            "Time a pool replica's engine spent iterating (gaps between its iterations, less its waits for work).",
            ("pool", "phase"),
        ),
        MetricSpec(
            "glimprouter_engine_tokens",
            "counter",
            "Tokens a pool's engines computed: decode (generated) and prefill (prompt tokens not cached).",
            ("pool", "kind"),
        ),
        MetricSpec(
            "glimprouter_engine_requests",
            "counter",
            "Engine requests that ran to their end (a stop or their token limit), by call: glimpse (one "
            "token) or generate (a step or final answer).",
            ("pool", "call"),
        ),
        MetricSpec(
            "glimprouter_engine_request_seconds",
            "counter",
            "Seconds of those engine requests, summed, by part: queued (waiting to be scheduled), running "
            "(first scheduled to last token), total (arrival to last output in the engine's front end).",
            ("pool", "call", "part"),
        ),
        MetricSpec(
            "glimprouter_tau_offset_nats",
            "gauge",
            "What the load-aware controller adds to each request's tau (router replica).",
            (),
        ),
        MetricSpec(
            "glimprouter_fair_queue_depth",
            "gauge",
            "Glimpses and steps waiting in the router replica's fair queue, by pool.",
            ("pool",),
        ),
        MetricSpec(
            "glimprouter_tau_changes", "counter", "Tau controller changes, by direction (up, down).", ("direction",)
        ),
    ]
}


@cache
def metric(name: str):
    """The Ray metric object for ``name`` (created once per process)."""
    from ray.util import metrics

    spec = SPECS[name]
    if spec.kind == "counter":
        return metrics.Counter(name, description=spec.description, tag_keys=spec.tags)
    if spec.kind == "gauge":
        return metrics.Gauge(name, description=spec.description, tag_keys=spec.tags)
    return metrics.Histogram(name, description=spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags)


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    """Add to a counter (adding nothing is a no-op: Ray's counters refuse a zero increment)."""
    if value:
        metric(name).inc(value, tags=tags or None)


def observe(name: str, value: float, **tags: str) -> None:
    """Record one histogram observation."""
    metric(name).observe(value, tags=tags or None)


_gauge_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
_gauge_refresh: asyncio.Task | None = None


def set_gauge(name: str, value: float, **tags: str) -> None:
    """Set a gauge. The value is kept and set again every ``GAUGE_REFRESH_S`` by the refresh task, which the first
    gauge set in a running event loop starts (see ``keep_gauges_exported``)."""
    metric(name).set(value, tags=tags or None)
    _gauge_values[(name, tuple(sorted(tags.items())))] = value
    if _gauge_refresh is None or _gauge_refresh.done():
        with suppress(RuntimeError):  # no running event loop here: the next gauge set in one starts it
            keep_gauges_exported()


def refresh_gauges() -> None:
    """Set every gauge this process has set to its last value again."""
    for (name, tags), value in list(_gauge_values.items()):
        metric(name).set(value, tags=dict(tags) or None)


async def _refresh_forever(period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        refresh_gauges()


def keep_gauges_exported(period_s: float = GAUGE_REFRESH_S) -> asyncio.Task:
    """Start, once per process and in the running event loop, the task that refreshes this process's gauges each
    ``period_s``: a gauge set once (a pool's calls in flight going to 0, a queue that emptied) would otherwise
    vanish from the scrape after two of Ray's report intervals, as if the replica were gone."""
    global _gauge_refresh
    loop = asyncio.get_running_loop()
    if _gauge_refresh is None or _gauge_refresh.done() or _gauge_refresh.get_loop() is not loop:
        _gauge_refresh = loop.create_task(_refresh_forever(period_s))
    return _gauge_refresh


@contextmanager
def timed(name: str, **tags: str) -> Iterator[None]:
    """Observe the block's wall time in seconds on histogram ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe(name, time.perf_counter() - start, **tags)


class LargeFraction:
    """Sliding window over a router replica's last steps, exported as ``glimprouter_large_step_fraction``."""

    def __init__(self, window: int = 200) -> None:
        self._pools: deque[bool] = deque(maxlen=window)
        self._large = 0  # large steps in the window, kept as steps come and go (no sum per step)

    def record(self, pool: str) -> float:
        if len(self._pools) == self._pools.maxlen:
            self._large -= self._pools[0]
        self._pools.append(pool == "large")
        self._large += pool == "large"
        fraction = self._large / len(self._pools)
        set_gauge("glimprouter_large_step_fraction", fraction)
        return fraction
