"""Locust users of two tenants on open-loop schedules of their own: a quiet one and a noisy neighbour.

    locust -f loadtests/noisy_neighbour_locustfile.py --headless --host http://127.0.0.1:8000 -u 24 -r 24 -t 180s \\
        --quiet-rate 0.2 --noisy-rate 1.6 [--quiet-priority standard --noisy-priority batch]

Keys: ``GLIMP_QUIET_KEY`` and ``GLIMP_NOISY_KEY``. ``--noisy-rate 0`` runs the quiet tenant alone. Each tenant's
requests start on its own global schedule (``loadtests.metrics.ArrivalSchedule``), whatever the other does, so
the quiet tenant's latency is what the scheduler gives it, not what its own closed loop would allow.

Stats entries: "quiet" and "noisy" hold each tenant's successful requests (whole response time); a failure is
recorded as "<tenant> HTTP <status>" (a refusal: 429 or 503, "<tenant> HTTP <status> without Retry-After" if
the header is missing), "<tenant> stream error" or "<tenant> HTTP 0" (no response); "<tenant> missed arrivals"
counts schedule slots skipped for want of users.
"""

from __future__ import annotations

import os
import time

import gevent
import requests
from locust import User, constant, events, task

from cluster.ops.problems import problems
from loadtests import metrics
from loadtests.locust_support import fire

PROMPTS = problems(200)
schedules: dict[str, metrics.ArrivalSchedule | None] = {}


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--quiet-rate", type=float, default=0.2, help="quiet tenant's requests/s")
    parser.add_argument("--noisy-rate", type=float, default=1.6, help="noisy tenant's requests/s (0: quiet alone)")
    parser.add_argument("--quiet-users", type=int, default=8, help="users holding the quiet tenant's schedule")
    parser.add_argument("--quiet-priority", default=None, help="class the quiet tenant's requests ask for")
    parser.add_argument("--noisy-priority", default=None, help="class the noisy tenant's requests ask for")
    parser.add_argument("--token-budget", type=int, default=96)
    parser.add_argument("--step-max-tokens", type=int, default=32)
    parser.add_argument("--final-max-tokens", type=int, default=32, help="the final answer's tokens")
    parser.add_argument("--model", default="glimprouter")


@events.init.add_listener
def _init(environment, **_):
    gevent.get_hub().loop.update_now()  # see loadtests/locustfile.py: Locust's run-time timer needs it
    opts = environment.parsed_options
    QuietUser.fixed_count = opts.quiet_users
    for name in ("quiet", "noisy"):
        if not os.environ.get(f"GLIMP_{name.upper()}_KEY"):
            raise SystemExit(f"set GLIMP_{name.upper()}_KEY to the {name} tenant's API key")


@events.test_start.add_listener
def _start(environment, **_):
    opts, now = environment.parsed_options, time.perf_counter()
    for name, rate in (("quiet", opts.quiet_rate), ("noisy", opts.noisy_rate)):
        schedules[name] = metrics.ArrivalSchedule(rate, now) if rate > 0 else None


class _TenantUser(User):
    abstract = True
    tenant = ""
    wait_time = constant(0)

    def on_start(self):
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {os.environ[f'GLIMP_{self.tenant.upper()}_KEY']}"
        self.options = self.environment.parsed_options
        self.sent = 0

    def _wait_for_slot(self) -> bool:
        schedule = schedules.get(self.tenant)
        if schedule is None:
            gevent.sleep(1.0)
            return False
        now = time.perf_counter()
        slot, missed = schedule.take(now)
        for _ in range(missed):
            fire("schedule", f"{self.tenant} missed arrivals", 0)
        gevent.sleep(max(0.0, slot - now))
        return True

    def body(self) -> dict:
        o = self.options
        priority = getattr(o, f"{self.tenant}_priority")
        body = {
            "model": o.model,
            "messages": [{"role": "user", "content": PROMPTS[self.sent % len(PROMPTS)]}],
            "token_budget": o.token_budget,
            "step_max_tokens": o.step_max_tokens,
            "final_max_tokens": o.final_max_tokens,
        }
        return {**body, "priority": priority} if priority else body

    @task
    def chat(self):
        if not self._wait_for_slot():
            return
        body, start = self.body(), time.perf_counter()
        self.sent += 1
        try:
            response = self.http.post(f"{self.host}/v1/chat/completions", json=body, timeout=(10, 900))
        except requests.RequestException as exc:
            fire("error", f"{self.tenant} HTTP 0", (time.perf_counter() - start) * 1000, error=str(exc))
            return
        ms = (time.perf_counter() - start) * 1000
        if response.status_code != 200:
            name = f"{self.tenant} HTTP {response.status_code}"
            if response.status_code in (429, 503) and "retry-after" not in response.headers:
                name += " without Retry-After"
            fire("error", name, ms, error=metrics.error_message(response.text))
            return
        out = metrics.read_body(response.json(), ms)
        fire("POST", self.tenant, out.total_ms)


class QuietUser(_TenantUser):
    """The quiet tenant (``GLIMP_QUIET_KEY``)."""

    tenant = "quiet"


class NoisyUser(_TenantUser):
    """The noisy neighbour (``GLIMP_NOISY_KEY``): every user not holding the quiet schedule."""

    tenant = "noisy"
