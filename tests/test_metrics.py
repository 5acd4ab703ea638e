"""Metrics: the router's sliding large-step fraction; the pools' engine counters."""

from collections import deque
from types import SimpleNamespace
from unittest import mock

import pytest

from cluster import metrics


def test_large_fraction_is_the_share_of_large_steps_in_the_last_window():
    with mock.patch.object(metrics, "set_gauge") as gauge:
        fraction, window = metrics.LargeFraction(window=3), deque(maxlen=3)
        for pool in ["large", "small", "large", "large", "small", "small", "small", "large"]:
            window.append(pool == "large")
            assert fraction.record(pool) == sum(window) / len(window)
    gauge.assert_called_with("glimprouter_large_step_fraction", 1 / 3)


def finished(max_tokens=96, reason="length", queued=0.002, running=0.010, total=0.030):
    """vLLM's stats of a finished engine request."""
    from vllm.v1.engine import FinishReason

    return SimpleNamespace(
        max_tokens_param=max_tokens,
        finish_reason=FinishReason[reason.upper()],
        queued_time=queued,
        inference_time=running,
        e2e_latency=total,
    )


def test_engine_stats_logger_counts_iterations_tokens_and_busy_time_but_not_waits(monkeypatch):
    from deployments import pool

    counted = []
    monkeypatch.setattr(metrics, "inc", lambda name, value=1, **tags: counted.append((name, value, tags.get("phase"))))
    monkeypatch.setattr(metrics, "set_gauge", lambda *args, **tags: None)
    clock = iter([10.0, 10.004, 10.010, 12.0, 12.005])
    logger = pool.engine_stats_logger("small", now=lambda: next(clock))(None)

    def iteration(running, waiting, done, decode=2, prefill=0):
        stats = SimpleNamespace(
            num_generation_tokens=decode,
            prompt_token_stats=SimpleNamespace(computed=prefill),
            finished_requests=[finished()] * done,
        )
        logger.record(SimpleNamespace(num_running_reqs=running, num_waiting_reqs=waiting), stats)

    iteration(2, 0, 0, prefill=30)  # 10.000: the first end, nothing before it to count
    iteration(2, 0, 0)  # 10.004: 4 ms busy
    iteration(2, 0, 2)  # 10.010: 6 ms busy; both requests finished, the engine waits
    iteration(1, 0, 0)  # 12.000: after a wait: not counted
    iteration(1, 0, 0)  # 12.005: 5 ms busy
    busy = [value for name, value, _ in counted if name == "glimprouter_engine_busy_seconds"]
    assert busy == pytest.approx([0.004, 0.006, 0.005])
    phases = [phase for name, _, phase in counted if name == "glimprouter_engine_iterations"]
    assert phases == ["mixed", "decode", "decode", "decode", "decode"]  # only the first computed prefill tokens
    assert ("glimprouter_engine_tokens", 30, None) in counted


def test_engine_stats_logger_times_the_requests_that_ran_to_their_end_by_call(monkeypatch):
    from deployments import pool

    counted = []
    monkeypatch.setattr(metrics, "inc", lambda name, value=1, **tags: counted.append((name, value, tags)))
    monkeypatch.setattr(metrics, "set_gauge", lambda *args, **tags: None)
    logger = pool.engine_stats_logger("small", now=lambda: 1.0)(None)

    stats = SimpleNamespace(
        num_generation_tokens=0,
        prompt_token_stats=SimpleNamespace(computed=0),
        finished_requests=[
            finished(1),  # a glimpse
            finished(96, "stop", queued=0.0),  # a step that stopped at its delimiter, never waited
            finished(96, "abort", running=-0.5),
        ],
    )  # a cancelled step: not timed
    logger.record(None, stats)
    requests = [tags for name, _, tags in counted if name == "glimprouter_engine_requests"]
    assert requests == [{"pool": "small", "call": "glimpse"}, {"pool": "small", "call": "generate"}]
    seconds = {
        (tags["call"], tags["part"]): value
        for name, value, tags in counted
        if name == "glimprouter_engine_request_seconds"
    }
    assert seconds == {
        ("glimpse", "queued"): 0.002,
        ("glimpse", "running"): 0.010,
        ("glimpse", "total"): 0.030,
        ("generate", "running"): 0.010,
        ("generate", "total"): 0.030,
    }  # no zero increment


def test_adding_nothing_to_a_counter_is_a_no_op(monkeypatch):
    """An answer of no tokens (a completion limit the steps spent) counts 0 tokens: Ray's counters refuse a zero
    increment, so none is sent."""
    calls = []
    monkeypatch.setattr(metrics, "metric", lambda name: type("C", (), {"inc": lambda self, v, tags: calls.append(v)})())
    metrics.inc("glimprouter_tokens", 0, tenant="t", pool="large")
    metrics.inc("glimprouter_tokens", 3, tenant="t", pool="large")
    assert calls == [3]


class RecordingGauge:
    def __init__(self):
        self.sets = []

    def set(self, value, tags=None):
        self.sets.append((value, tags))


def test_every_gauge_set_is_set_again_by_the_refresh_until_it_changes(monkeypatch):
    """Ray's agent drops a gauge not set within two report intervals: the refresh sets each series' last value."""
    import asyncio

    gauges = {}
    monkeypatch.setattr(metrics, "metric", lambda name: gauges.setdefault(name, RecordingGauge()))
    monkeypatch.setattr(metrics, "_gauge_values", {})
    monkeypatch.setattr(metrics, "_gauge_refresh", None)
    metrics.set_gauge("glimprouter_pool_ongoing_requests", 3, pool="small")  # no event loop: nothing started
    assert metrics._gauge_refresh is None
    metrics.set_gauge("glimprouter_pool_ongoing_requests", 0, pool="small")
    metrics.set_gauge("glimprouter_large_step_fraction", 0.25)

    async def two_periods():
        task = metrics.keep_gauges_exported(period_s=0.01)
        assert metrics.keep_gauges_exported(period_s=0.01) is task  # once per process
        await asyncio.sleep(0.035)
        task.cancel()

    asyncio.run(two_periods())
    ongoing = gauges["glimprouter_pool_ongoing_requests"].sets
    assert ongoing[:2] == [(3, {"pool": "small"}), (0, {"pool": "small"})]
    assert all(s == (0, {"pool": "small"}) for s in ongoing[2:]) and len(ongoing) >= 4
    assert all(s == (0.25, None) for s in gauges["glimprouter_large_step_fraction"].sets)
    assert len(gauges["glimprouter_large_step_fraction"].sets) >= 3

    async def set_in_a_loop():
        metrics.set_gauge("glimprouter_pool_queue_depth", 1, pool="large")
        started = metrics._gauge_refresh
        assert started is not None and not started.done()  # the first gauge set in a loop starts the refresh
        metrics.set_gauge("glimprouter_pool_queue_depth", 2, pool="large")
        assert metrics._gauge_refresh is started
        started.cancel()

    asyncio.run(set_in_a_loop())
