"""Load test helpers (no network): reading SSE streams and bodies, metric samples, the arrival schedule,
scenario parsing and the summary from Locust's stats CSV."""

from __future__ import annotations

import csv

import pytest

from cluster.config import PolicySettings
from loadtests import metrics
from loadtests.run import parse_scenario, summarize
from router_service.loop import AnswerDone
from router_service.responses import ChunkWriter, routing_summary, usage
from router_service.state import StepRecord

STEPS = [
    StepRecord(0, "small", 0.2, "a", 10, 100, 0, 1.0, 10.0, "stop"),
    StepRecord(1, "large", 2.5, "b", 20, 110, 90, 1.1, 30.0, "stop"),
]
ANSWER = AnswerDone("large", "42", prompt_tokens=150, cached_tokens=140, output_tokens=11, finish_reason=None, ms=9.0)
USAGE = usage(STEPS, ANSWER, prompt_tokens=30, glimpses=2)  # 41 completion tokens: small 10, large 31
ROUTING = routing_summary(PolicySettings(policy="glimprouter", tau=1.0), STEPS)


def sse(*chunks: str) -> list[str]:
    """The lines a client reads (``iter_lines``) from these SSE chunks."""
    return [line for chunk in chunks for line in chunk.split("\n")]


def timed(lines: list[str], step: float = 0.1) -> list[tuple[float, str]]:
    """Each line arriving ``step`` seconds after the previous one, the first at 100 + step."""
    return [(100 + step * (i + 1), line) for i, line in enumerate(lines)]


def streamed_lines() -> list[str]:
    w = ChunkWriter("chatcmpl-1", "glimprouter", chat=True)
    return sse(
        w.delta(role="assistant", content=""),
        w.delta(reasoning="think"),
        w.delta(reasoning=" more"),
        w.delta(content="42"),
        w.finish("stop", ROUTING),
        w.usage(USAGE),
        w.done(),
    )


def test_read_stream_times_usage_and_routing():
    lines = streamed_lines()
    out = metrics.read_stream(timed(lines), start=100)
    first_reasoning = next(i for i, line in enumerate(lines) if "think" in line)
    first_answer = next(i for i, line in enumerate(lines) if '"content": "42"' in line)
    assert out.ttft_ms == pytest.approx(100 * (first_reasoning + 1))  # the empty role chunk does not count
    assert out.ttfa_ms == pytest.approx(100 * (first_answer + 1))
    assert out.total_ms == pytest.approx(100 * len(lines))
    assert out.usage == USAGE and out.routing == ROUTING and out.streamed and out.error is None


def test_read_stream_errors():
    w = ChunkWriter("chatcmpl-1", "glimprouter", chat=True)
    failed = sse(w.delta(reasoning="a"), w.error({"error": {"message": "large pool unavailable"}}), w.done())
    assert metrics.read_stream(timed(failed), start=100).error == "large pool unavailable"
    cut = sse(w.delta(reasoning="a"), w.finish("stop", ROUTING), w.done())  # no usage chunk
    assert metrics.read_stream(timed(cut), start=100).error == "stream ended without usage"


def test_samples_of_a_streamed_request():
    out = metrics.Outcome(total_ms=2000, ttft_ms=400, ttfa_ms=1500, usage=USAGE, routing=ROUTING, streamed=True)
    assert dict(metrics.samples(out)) == pytest.approx(
        {
            metrics.TTFT: 400,
            metrics.TTFA: 1500,
            metrics.TPOT: 1600 / 40,
            metrics.STEPS: 2,
            metrics.LARGE_PERCENT: 50.0,
            "small tokens/s": 10 / 2,
            "large tokens/s": 31 / 2,
        }
    )
    assert set(dict(metrics.samples(out))) == set(metrics.METRIC_NAMES)


def test_samples_of_a_whole_response():
    body = {"choices": [], "usage": USAGE, "routing": ROUTING}
    found = dict(metrics.samples(metrics.read_body(body, total_ms=500)))
    assert found[metrics.TTFT] == 500 and metrics.TTFA not in found and metrics.TPOT not in found
    assert found["large tokens/s"] == pytest.approx(62)


def test_error_message():
    assert metrics.error_message('{"error": {"message": "rate limit", "type": "rate_limit_error"}}') == "rate limit"
    assert metrics.error_message("upstream timeout") == "upstream timeout"


def test_arrival_schedule_slots_and_misses():
    s = metrics.ArrivalSchedule(rate=2.0, start=10.0, tolerance_s=1.0)
    assert s.take(10.0) == (10.0, 0)
    assert s.take(10.0) == (10.5, 0)  # the next slot, in the future
    assert s.take(11.9) == (11.0, 0)  # 0.9 s late: still sent
    assert s.take(14.2) == (13.5, 4)  # 11.5, 12.0, 12.5 and 13.0 are over 1 s late: skipped
    assert s.take(14.2) == (14.0, 0)


def test_throttle():
    t = metrics.Throttle(10.0)
    assert [t.ready(now) for now in (0.0, 5.0, 10.0, 15.0, 20.5)] == [True, False, True, False, True]


def test_parse_scenario():
    assert parse_scenario("large_only") == ("large_only", ["--policy", "large_only"])
    assert parse_scenario("glimprouter:tau=1.0,stream=true") == (
        "glimprouter-tau1.0-streamtrue",
        ["--policy", "glimprouter", "--tau", "1.0", "--stream", "true"],
    )
    with pytest.raises(ValueError):
        parse_scenario("glimprouter:temperature=1")


def test_summarize(tmp_path):
    columns = ["Type", "Name", "Request Count", "Failure Count", "Average Response Time", "Requests/s", "50%", "95%"]
    rows = [
        ["POST", "/v1/chat/completions", 8, 0, 900, 0.4, 800, 1500],
        ["error", "HTTP 429", 2, 2, 5, 0.1, 5, 5],
        ["metric", metrics.TTFT, 8, 0, 300, 0.4, 250, 600],
        ["metric", metrics.LARGE_PERCENT, 8, 0, 37.5, 0.4, 33, 67],
        ["metric", "small tokens/s", 8, 0, 12.5, 0.4, 12, 20],
        ["", "Aggregated", 34, 2, 100, 2.0, 50, 900],
    ]
    path = tmp_path / "s_stats.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([columns, *rows])
    assert summarize(path) == {
        "requests": 10,
        "failures": 2,
        "req/s": 0.4,
        "p50 ms": 800,
        "p95 ms": 1500,
        "p50 TTFT ms": 250,
        "large %": 37.5,
        "small tok/s": 12.5,
        "large tok/s": None,
    }
