"""CI smoke test of the Locust load test against the local cluster: two tenants, two users, mixed streaming."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from loadtests import metrics

pytestmark = pytest.mark.cluster


def test_loadtest_records_every_metric(local_cluster, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(local_cluster.new_tenant(name) for name in ("loadtest-a", "loadtest-b")) + "\n")
    out = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.run",
            "--url",
            local_cluster.base_url,
            "--scenario",
            "glimprouter",
            "--users",
            "2",
            "--duration",
            "60s",
            "--stop-timeout",
            "120s",
            "--stream",
            "mixed",
            "--token-budget",
            "96",
            "--step-max-tokens",
            "32",
            "--keys-file",
            str(keys),
            "--out",
            str(out),
            "--fail-on-errors",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with open(out / "glimprouter_stats.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    assert sum(int(r["Failure Count"]) for r in rows) == 0, rows
    counts = {r["Name"]: int(r["Request Count"]) for r in rows}
    assert counts.get("/v1/chat/completions", 0) >= 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert all(counts.get(name, 0) >= 1 for name in metrics.METRIC_NAMES), counts
    assert (out / "latency.png").stat().st_size > 0 and (out / "glimprouter.html").stat().st_size > 0
