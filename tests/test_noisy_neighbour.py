"""The noisy-neighbour runner's pure parts: the tenants file, per-tenant stats from Locust's CSV, pool token
shares from two usage readings, the docs' comparison line."""

from __future__ import annotations

import csv
import json

import pytest

from loadtests.noisy_neighbour import compare_line, read_tenants, tenant_stats, token_shares

FIELDS = ["Type", "Name", "Request Count", "Failure Count", "50%", "95%"]


def test_read_tenants_takes_two_create_outputs_quiet_first():
    text = json.dumps({"tenant": "q", "key": "k1", "prefix": "p"}, indent=2) + "\n" + json.dumps(
        {"tenant": "n", "key": "k2", "prefix": "p2"})
    assert read_tenants(text) == [{"tenant": "q", "key": "k1"}, {"tenant": "n", "key": "k2"}]
    with pytest.raises(ValueError, match="two tenants"):
        read_tenants(json.dumps({"tenant": "q", "key": "k1"}))


def test_tenant_stats_split_successes_refusals_and_failures(tmp_path):
    path = tmp_path / "x_stats.csv"
    rows = [["POST", "quiet", 40, 0, 900, 1500], ["POST", "noisy", 100, 0, 2000, 6000],
            ["error", "noisy HTTP 503", 12, 12, 5, 9], ["error", "noisy HTTP 429 without Retry-After", 1, 1, 5, 5],
            ["error", "quiet stream error", 2, 2, 100, 100], ["schedule", "noisy missed arrivals", 3, 0, 0, 0],
            ["", "Aggregated", 158, 15, 1000, 5000]]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows(rows)
    stats = tenant_stats(path)
    assert stats["quiet"] == {"requests": 40, "p50_ms": 900.0, "p95_ms": 1500.0, "refused": 0,
                              "refused_without_retry_after": 0, "failed": 2}
    assert stats["noisy"]["refused"] == 13 and stats["noisy"]["refused_without_retry_after"] == 1
    assert stats["noisy"]["failed"] == 0


def usage(small: int, large: int) -> dict:
    return {"pools": {"small": {"output_tokens": small}, "large": {"output_tokens": large}}}


def test_token_shares_are_the_differences_of_two_readings():
    before = {"quiet": usage(100, 10), "noisy": usage(1000, 50)}
    after = {"quiet": usage(400, 110), "noisy": usage(1900, 150)}
    shares = token_shares(before, after)
    assert shares == {"small": {"quiet": 0.25, "noisy": 0.75}, "large": {"quiet": 0.5, "noisy": 0.5}}


def test_compare_line():
    fair = {"alone": {"quiet": {"p95_ms": 1000.0}}, "shared": {"quiet": {"p95_ms": 1200.0}}}
    fcfs = {"alone": {"quiet": {"p95_ms": 1000.0}}, "shared": {"quiet": {"p95_ms": 3400.0}}}
    assert compare_line(fair, fcfs) == ("quiet tenant p95 under a noisy neighbour: 1.20x alone "
                                        "(3.40x without fair shares)")
