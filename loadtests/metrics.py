"""What one chat completion measured, read from its SSE lines or JSON body, and the open-loop arrival schedule.

Pure helpers (no Locust, no network) for ``loadtests/locustfile.py``. Every token count comes from the
response's ``usage``; chunks are never counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass

# Names of the custom Locust stats entries. Locust shows each value in its "ms" columns.
TTFT = "TTFT ms"  # streaming: first content/reasoning chunk; else the whole response
TTFA = "time to first answer token ms"  # streaming only
TPOT = "time per output token ms"  # streaming only: (total - TTFT) / (completion_tokens - 1)
STEPS = "steps per request"  # a count, not ms
LARGE_PERCENT = "large-step %"  # routing.large_step_fraction x 100
TOKENS_PER_S = {pool: f"{pool} tokens/s" for pool in ("small", "large")}  # pool's completion tokens / request time
MISSED = "missed arrivals"  # open loop: one sample per schedule slot skipped
METRIC_NAMES = [TTFT, TTFA, TPOT, STEPS, LARGE_PERCENT, *TOKENS_PER_S.values()]


@dataclass
class Outcome:
    """One request's result: times in ms from the request's start, the usage and routing objects, or an error."""

    total_ms: float
    ttft_ms: float | None = None
    ttfa_ms: float | None = None
    usage: dict | None = None
    routing: dict | None = None
    streamed: bool = False
    error: str | None = None


def read_body(body: dict, total_ms: float) -> Outcome:
    """A whole (non-streamed) response: the first token only arrives with the last, so TTFT is the total."""
    return Outcome(total_ms, ttft_ms=total_ms, usage=body.get("usage"), routing=body.get("routing"))


def read_stream(timed_lines: Iterable[tuple[float, str]], start: float) -> Outcome:
    """An SSE stream given as ``(perf_counter time, line)`` pairs: TTFT at the first chunk with any reasoning
    or answer text, TTFA at the first answer text, ``routing`` from the finish chunk, ``usage`` from the last.
    A stream that carries an error object, or ends without usage, is an error."""
    out = Outcome(0.0, streamed=True)
    now = start
    for now, line in timed_lines:
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        chunk = json.loads(line[5:])
        ms = (now - start) * 1000
        if "error" in chunk:
            out.error = chunk["error"].get("message", "error in stream")
        delta = (chunk.get("choices") or [{}])[0].get("delta", {})
        if out.ttft_ms is None and (delta.get("content") or delta.get("reasoning_content")):
            out.ttft_ms = ms
        if out.ttfa_ms is None and delta.get("content"):
            out.ttfa_ms = ms
        out.routing = chunk.get("routing") or out.routing
        out.usage = chunk.get("usage") or out.usage
    out.total_ms = (now - start) * 1000
    if out.error is None and out.usage is None:
        out.error = "stream ended without usage"
    return out


def error_message(text: str) -> str:
    """The message of an OpenAI error body, else the start of the body."""
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


def samples(out: Outcome) -> list[tuple[str, float]]:
    """The custom metric samples of a successful request, as ``(entry name, value)``."""
    usage, routing = out.usage or {}, out.routing or {}
    found = [(TTFT, out.ttft_ms)]
    if out.streamed:
        found.append((TTFA, out.ttfa_ms))
        tokens = usage.get("completion_tokens", 0)
        if out.ttft_ms is not None and tokens > 1:
            found.append((TPOT, (out.total_ms - out.ttft_ms) / (tokens - 1)))
    if routing:
        found += [
            (STEPS, len(routing.get("steps", []))),
            (LARGE_PERCENT, 100 * routing.get("large_step_fraction", 0.0)),
        ]
    seconds = out.total_ms / 1000
    for pool, name in TOKENS_PER_S.items():
        used = usage.get("per_pool", {}).get(pool)
        if used is not None and seconds > 0:
            found.append((name, used["completion_tokens"] / seconds))
    return [(name, value) for name, value in found if value is not None]


class ArrivalSchedule:
    """A global open-loop schedule: request ``i`` starts at ``start + i / rate``. Each caller takes the next
    free slot; slots already more than ``tolerance_s`` in the past are skipped and counted as missed."""

    def __init__(self, rate: float, start: float, tolerance_s: float = 1.0):
        self.rate, self.start, self.tolerance_s = rate, start, tolerance_s
        self.next_index = 0

    def take(self, now: float) -> tuple[float, int]:
        """The start time of the caller's slot and how many slots were missed before it."""
        earliest = max(0, math.ceil((now - self.tolerance_s - self.start) * self.rate))
        missed = max(0, earliest - self.next_index)
        index = self.next_index + missed
        self.next_index = index + 1
        return self.start + index / self.rate, missed


class Throttle:
    """True at most once per ``interval_s`` (for warnings)."""

    def __init__(self, interval_s: float):
        self.interval_s, self.last = interval_s, -math.inf

    def ready(self, now: float) -> bool:
        """Whether the interval has passed since the last True (and if so, start a new one)."""
        if now - self.last < self.interval_s:
            return False
        self.last = now
        return True
