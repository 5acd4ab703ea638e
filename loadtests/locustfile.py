"""Locust users sending chat completions to GlimpRouter as several tenants.

    locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 -u 4 -r 4 -t 60s \\
        --policy glimprouter --tau 1.0 --stream mixed --token-budget 96 --step-max-tokens 32 [--arrival-rate 0.5]

Keys: ``GLIMP_API_KEYS`` (comma-separated) or ``GLIMP_KEYS_FILE`` (one per line); users take them in turn.
Closed loop (``--arrival-rate 0``): each user sends its next request as soon as the last one ends. Open loop:
requests start on one global schedule, ``--arrival-rate`` a second, each user taking the next slot; slots
more than 1 s late are skipped, counted in "missed arrivals" and warned about (once per 10 s); give
enough users (-u) to hold the rate.

Stats entries: "POST /v1/chat/completions" holds the successful requests (whole response time); each
failure is recorded once, as a failure of the entry "HTTP <status>" (0: no response) or "stream error",
with the OpenAI error message. Custom metrics (``loadtests.metrics``) are entries of type "metric"
whose value Locust shows in its ms columns: TTFT and TPOT in ms, "steps per request" as a count,
"large-step %" in percent, "<pool> tokens/s" in tokens a second. Locust rounds values of 100 and more to
two significant digits in percentiles; averages are exact.
"""

from __future__ import annotations

import itertools
import logging
import time

import gevent
import requests
from locust import User, events, task

from cluster.ops.problems import problems
from loadtests import metrics
from loadtests.keys import api_keys
from loadtests.locust_support import fire

PROMPTS = problems(200)
_users, _requests = itertools.count(), itertools.count()
_warn = metrics.Throttle(10.0)
keys: list[str] = []
schedule: metrics.ArrivalSchedule | None = None


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--policy", choices=["glimprouter", "large_only", "small_only"], default="glimprouter")
    parser.add_argument("--tau", type=float, default=None, help="entropy threshold (default: the tenant's)")
    parser.add_argument(
        "--stream", choices=["true", "false", "mixed"], default="mixed", help="mixed: every other request streams"
    )
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--step-max-tokens", type=int, default=None)
    parser.add_argument("--arrival-rate", type=float, default=0.0, help="requests/s for open loop; 0: closed loop")
    parser.add_argument("--model", default="glimprouter")


@events.init.add_listener
def _init(**_):
    # Locust's --run-time timer counts from gevent's cached loop clock, which a slow start (seconds on a
    # busy machine) leaves behind: without this refresh the run ends that much early.
    gevent.get_hub().loop.update_now()
    keys.extend(api_keys())
    if not keys:
        logging.error(
            "no API keys: set GLIMP_API_KEYS (comma-separated) or GLIMP_KEYS_FILE (keys one a line, or "
            "`tenants create --json` output)"
        )
        raise SystemExit(2)


@events.test_start.add_listener
def _start(environment, **_):
    global schedule
    rate = environment.parsed_options.arrival_rate
    schedule = metrics.ArrivalSchedule(rate, time.perf_counter()) if rate > 0 else None


class TenantUser(User):
    """Sends chat completions with one tenant's key, the scenario's fields and the bundled prompts."""

    def on_start(self):
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {keys[next(_users) % len(keys)]}"
        self.options = self.environment.parsed_options
        gevent.sleep(self.wait_time())

    def wait_time(self) -> float:
        """Closed loop: none. Open loop: until this user's next slot on the global schedule."""
        if schedule is None:
            return 0.0
        now = time.perf_counter()
        slot, missed = schedule.take(now)
        for _ in range(missed):
            fire("schedule", metrics.MISSED, 0)
        if missed and _warn.ready(now):
            logging.warning("arrival rate %.2f/s not kept: %d slot(s) skipped; add users (-u)", schedule.rate, missed)
        return max(0.0, slot - now)

    def body(self, i: int) -> dict:
        """The request body of the ``i``-th request of the run."""
        o = self.options
        stream = o.stream == "true" or (o.stream == "mixed" and i % 2 == 0)
        fields = {
            "policy": o.policy,
            "tau": o.tau,
            "token_budget": o.token_budget,
            "step_max_tokens": o.step_max_tokens,
            "stream": stream,
        }
        body = {
            "model": o.model,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            **{k: v for k, v in fields.items() if v is not None},
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @task
    def chat(self):
        body = self.body(next(_requests))
        start = time.perf_counter()
        try:
            with self.http.post(
                f"{self.host}/v1/chat/completions", json=body, stream=body["stream"], timeout=(10, 900)
            ) as response:
                if response.status_code != 200:
                    fire(
                        "error",
                        f"HTTP {response.status_code}",
                        (time.perf_counter() - start) * 1000,
                        error=metrics.error_message(response.text),
                    )
                    return
                if body["stream"]:
                    lines = ((time.perf_counter(), line.decode()) for line in response.iter_lines())
                    out = metrics.read_stream(lines, start)
                else:
                    out = metrics.read_body(response.json(), (time.perf_counter() - start) * 1000)
        except requests.RequestException as exc:
            fire("error", "HTTP 0", (time.perf_counter() - start) * 1000, error=str(exc))
            return
        if out.error:
            fire("error", "stream error", out.total_ms, error=out.error)
            return
        fire("POST", "/v1/chat/completions", out.total_ms)
        for name, value in metrics.samples(out):
            fire("metric", name, value)
