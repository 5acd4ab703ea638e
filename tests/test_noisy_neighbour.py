"""The noisy-neighbour runner's pure parts: the tenants file, per-tenant stats from Locust's CSV, pool token
shares from two usage readings, the docs' comparison line."""

from __future__ import annotations

import csv
import json

import pytest

from loadtests.noisy_neighbour import (
    compare_line,
    large_step_shares,
    metered,
    read_tenants,
    run_seconds,
    tenant_stats,
    token_shares,
)

FIELDS = ["Type", "Name", "Request Count", "Failure Count", "50%", "95%"]


def test_read_tenants_takes_two_create_outputs_quiet_first():
    text = (
        json.dumps({"tenant": "q", "key": "k1", "prefix": "p"}, indent=2)
        + "\n"
        + json.dumps({"tenant": "n", "key": "k2", "prefix": "p2"})
    )
    assert read_tenants(text) == [{"tenant": "q", "key": "k1"}, {"tenant": "n", "key": "k2"}]
    with pytest.raises(ValueError, match="two tenants"):
        read_tenants(json.dumps({"tenant": "q", "key": "k1"}))


def test_tenant_stats_split_successes_refusals_and_failures(tmp_path):
    path = tmp_path / "x_stats.csv"
    rows = [
        ["POST", "quiet", 40, 0, 900, 1500],
        ["POST", "noisy", 100, 0, 2000, 6000],
        ["error", "noisy HTTP 503", 12, 12, 5, 9],
        ["error", "noisy HTTP 429 without Retry-After", 1, 1, 5, 5],
        ["error", "quiet stream error", 2, 2, 100, 100],
        ["schedule", "noisy missed arrivals", 3, 0, 0, 0],
        ["", "Aggregated", 158, 15, 1000, 5000],
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    stats = tenant_stats(path)
    assert stats["quiet"] == {
        "requests": 40,
        "p50_ms": 900.0,
        "p95_ms": 1500.0,
        "refused": 0,
        "refused_without_retry_after": 0,
        "failed": 2,
    }
    assert stats["noisy"]["refused"] == 13 and stats["noisy"]["refused_without_retry_after"] == 1
    assert stats["noisy"]["failed"] == 0


def usage(small: int, large: int, small_steps: int = 0, large_steps: int = 0) -> dict:
    return {
        "pools": {
            "small": {"output_tokens": small, "steps": small_steps},
            "large": {"output_tokens": large, "steps": large_steps},
        }
    }


def test_token_shares_are_the_differences_of_two_readings():
    before = {"quiet": usage(100, 10), "noisy": usage(1000, 50)}
    after = {"quiet": usage(400, 110), "noisy": usage(1900, 150)}
    shares = token_shares(before, after)
    assert shares == {"small": {"quiet": 0.25, "noisy": 0.75}, "large": {"quiet": 0.5, "noisy": 0.5}}


def test_charged_shares_add_prefilled_prompt_tokens_at_their_cost():
    """The fair queue's measure: a tenant whose calls prefill more is charged more than its output tokens say."""
    before = {"quiet": usage(0, 0), "noisy": usage(0, 0)}
    after = {"quiet": usage(100, 0), "noisy": usage(300, 0)}
    after["quiet"]["pools"]["small"]["prefill_tokens"] = 200
    after["noisy"]["pools"]["small"]["prefill_tokens"] = 0
    for reading in (*before.values(), *after.values()):
        for counts in reading["pools"].values():
            counts.setdefault("prefill_tokens", 0)
    assert token_shares(before, after)["small"] == {"quiet": 0.25, "noisy": 0.75}
    assert token_shares(before, after, prefill_cost=0.5)["small"] == {"quiet": 0.4, "noisy": 0.6}


def test_large_step_shares_are_each_tenants_large_steps_over_its_steps_between_two_readings():
    before = {"quiet": usage(0, 0, 10, 10), "noisy": usage(0, 0, 5, 5), "idle": usage(0, 0, 3, 1)}
    after = {"quiet": usage(0, 0, 40, 20), "noisy": usage(0, 0, 5, 15), "idle": usage(0, 0, 3, 1)}
    assert large_step_shares(before, after) == {"quiet": 0.25, "noisy": 1.0, "idle": None}


def test_metered_reads_the_routers_token_and_step_counters_per_tenant_and_pool():
    def sample(name, tenant, pool):
        return ("ray_glimprouter_" + name, frozenset({("tenant", tenant), ("pool", pool)}))

    samples = {
        sample("tokens_total", "q", "small"): 300.0,
        sample("tokens_total", "q", "large"): 100.0,
        sample("steps_total", "q", "small"): 9.0,
        sample("steps_total", "q", "large"): 3.0,
        sample("prefill_tokens_total", "q", "small"): 40.0,
        sample("tokens_total", "n", "small"): 900.0,
        sample("steps_total", "other", "small"): 50.0,
    }
    got = metered(samples, [{"tenant": "q", "key": "kq"}, {"tenant": "n", "key": "kn"}])
    assert got["quiet"]["pools"] == {
        "small": {"output_tokens": 300, "prefill_tokens": 40, "steps": 9},
        "large": {"output_tokens": 100, "prefill_tokens": 0, "steps": 3},
    }
    assert got["noisy"]["pools"]["small"] == {"output_tokens": 900, "prefill_tokens": 0, "steps": 0}
    assert large_step_shares({r: usage(0, 0) for r in got}, got) == {"quiet": 0.25, "noisy": None}


def test_run_seconds_reads_locust_run_times():
    assert [run_seconds(t) for t in ("180s", "3m", "1h30m", "45", "2.5")] == [180, 180, 5400, 45, 2.5]
    with pytest.raises(ValueError, match="not a Locust run time"):
        run_seconds("3 minutes")


def test_compare_line():
    fair = {"alone": {"quiet": {"p95_ms": 1000.0}}, "shared": {"quiet": {"p95_ms": 1200.0}}}
    fcfs = {"alone": {"quiet": {"p95_ms": 1000.0}}, "shared": {"quiet": {"p95_ms": 3400.0}}}
    assert compare_line(fair, fcfs) == (
        "quiet tenant p95 under a noisy neighbour: 1.20x alone (3.40x without fair shares)"
    )
    starved = {"alone": {"quiet": {"p95_ms": 1000.0}}, "shared": {"quiet": {"p95_ms": None}}}
    assert compare_line(starved, fcfs).startswith("quiet tenant p95 under a noisy neighbour: none (no quiet request")


class StubAPI:
    """A stand-in for the router's HTTP API (chat completions and the admin usage endpoint), answering the
    noisy tenant's every third request with 503 and Retry-After."""

    def __init__(self):
        import http.server
        import threading

        self.chats, self.usage = {"kq": 0, "kn": 0}, {"quiet": 0, "noisy": 0}
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                key = self.headers["Authorization"].split()[-1]
                stub.chats[key] += 1
                if key == "kn" and stub.chats[key] % 3 == 0:
                    return self._json(503, {"error": {"message": "overloaded"}}, {"Retry-After": "1"})
                tenant = "quiet" if key == "kq" else "noisy"
                stub.usage[tenant] += 10
                self._json(
                    200,
                    {
                        "choices": [{"message": {"content": "42"}}],
                        "usage": {"completion_tokens": 10},
                        "routing": {"steps": []},
                    },
                )

            def do_GET(self):
                tenant = self.path.split("/")[4]
                tokens = stub.usage[tenant]
                pools = {
                    "small": {"output_tokens": tokens, "steps": tokens // 10 * 2},
                    "large": {"output_tokens": tokens // 2, "steps": tokens // 10},
                }
                self._json(200, {"pools": pools})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.mark.parametrize("shared_only", [False, True])
def test_the_runner_drives_both_phases_through_locust_and_summarises_them(tmp_path, shared_only):
    import subprocess
    import sys

    api = StubAPI()
    tenants = tmp_path / "tenants.json"
    tenants.write_text(
        json.dumps({"tenant": "quiet", "key": "kq"}) + "\n" + json.dumps({"tenant": "noisy", "key": "kn"})
    )
    admin = tmp_path / "admin.key"
    admin.write_text("admin\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.noisy_neighbour",
            "--url",
            api.url,
            "--tenants-file",
            str(tenants),
            "--admin-key-file",
            str(admin),
            "--quiet-rate",
            "2",
            "--noisy-rate",
            "6",
            "--users",
            "6",
            "--quiet-users",
            "2",
            "--duration",
            "4s",
            "--stop-timeout",
            "5s",
            "--label",
            "stub",
            "--out",
            str(tmp_path / "out"),
            *(["--shared-only"] if shared_only else []),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    api.server.shutdown()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "stub.json").read_text())
    if shared_only:
        assert "alone" not in summary and api.chats["kq"] <= 12  # one phase of 4 s at 2 requests/s (two: about 16)
    else:
        assert summary["alone"]["noisy"]["requests"] == 0 and summary["alone"]["quiet"]["requests"] >= 4
    shared = summary["shared"]
    assert shared["quiet"]["requests"] >= 4 and shared["quiet"]["refused"] == 0
    assert shared["noisy"]["requests"] >= 8 and shared["noisy"]["refused"] >= 3
    assert shared["noisy"]["refused_without_retry_after"] == 0 and shared["noisy"]["failed"] == 0
    assert set(summary["token_shares_with_drain"]) == {"small", "large"}  # read after the drain, the other before
    small = summary["token_shares"]["small"]
    assert small["noisy"] > small["quiet"] > 0 and abs(small["noisy"] + small["quiet"] - 1) < 1e-3
    assert summary["steps"]["quiet"]["small"] == 2 * summary["steps"]["quiet"]["large"] > 0
    assert summary["large_step_shares"] == {
        "quiet": pytest.approx(1 / 3, abs=0.02),
        "noisy": pytest.approx(1 / 3, abs=0.02),
    }
