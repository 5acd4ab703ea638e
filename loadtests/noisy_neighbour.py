"""The noisy-neighbour scenario: a quiet tenant alone, then beside a noisy one; p95s, pool token shares, refusals.

    python -m loadtests.noisy_neighbour --url http://127.0.0.1:8000 --tenants-file tenants.json \\
        --admin-key-file run/admin.key --quiet-rate 0.2 --noisy-rate 1.6 --duration 180s --label fair --out results/
    python -m loadtests.noisy_neighbour --compare results/fair.json results/fcfs.json

``--tenants-file`` holds what ``python -m cluster tenants create NAME --json`` printed for two tenants: the
first is the quiet one, the second the noisy one. Run it once against a cluster with ``router.fairness.enabled``
and once without (``--label`` names each run); ``--compare`` prints the line ``docs/tenancy.md`` records. Each
phase writes Locust's CSVs under ``--out``; ``<label>.json`` holds the summary: each tenant's request count,
p50 and p95 (ms), refusals and failures, and its share of each pool's output tokens and of its steps written by
the large pool during the shared phase, up to the end of its run time and with the drain after it: from the
router's counters with ``--metrics-url`` (step by step), else from the admin usage endpoint (which counts a
request when it finishes, so a window shorter than the requests misreads; a phase that crosses midnight UTC too).
With ``--metrics-url`` it also has the charged shares: output tokens plus ``--prefill-token-cost`` per prompt token
prefilled, what the fair queue's counters are charged (``router_service/fairness.py``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from cluster.config import FairnessSettings
from loadtests.locust_support import headless_command

LOCUSTFILE = Path(__file__).with_name("noisy_neighbour_locustfile.py")
TENANTS = ("quiet", "noisy")
POOLS = ("small", "large")
SPAWNED = "All users spawned"  # Locust's log line once every user runs


def read_tenants(text: str) -> list[dict]:
    """The ``{"tenant", "key"}`` objects of ``tenants create --json`` output, one after another."""
    decoder, found, at, text = json.JSONDecoder(), [], 0, text.strip()
    while at < len(text):
        value, at = decoder.raw_decode(text, at)
        found.append({"tenant": value["tenant"], "key": value["key"]})
        while at < len(text) and text[at].isspace():
            at += 1
    if len(found) != 2:
        raise ValueError(f"expected two tenants (quiet, then noisy), found {len(found)}")
    return found


def tenant_stats(stats_csv: Path) -> dict[str, dict]:
    """Per tenant: successful requests, p50/p95 ms, refusals (429/503) and other failures, from ``_stats.csv``."""
    with open(stats_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] != "Aggregated"]
    out = {}
    for tenant in TENANTS:
        ok = next((r for r in rows if r["Name"] == tenant), None)
        failed = [r for r in rows if r["Name"].startswith(f"{tenant} ") and "missed" not in r["Name"]]
        refused = [r for r in failed if r["Name"].split()[1:3] in (["HTTP", "429"], ["HTTP", "503"])]
        out[tenant] = {
            "requests": int(ok["Request Count"]) if ok else 0,
            "p50_ms": float(ok["50%"]) if ok and int(ok["Request Count"]) else None,
            "p95_ms": float(ok["95%"]) if ok and int(ok["Request Count"]) else None,
            "refused": sum(int(r["Failure Count"]) for r in refused),
            "refused_without_retry_after": sum(int(r["Failure Count"]) for r in failed if "without" in r["Name"]),
            "failed": sum(int(r["Failure Count"]) for r in failed if r not in refused),
        }
    return out


def token_shares(
    before: dict[str, dict], after: dict[str, dict], prefill_cost: float = 0.0
) -> dict[str, dict[str, float]]:
    """Each tenant's share of each pool's tokens between two usage readings (tenant -> usage): output tokens, plus
    ``prefill_cost`` per prefilled prompt token (the fair queue's charge, with its ``prefill_token_cost``)."""

    def tokens(reading: dict, pool: str) -> float:
        counts = reading["pools"][pool]
        return counts["output_tokens"] + (prefill_cost * counts["prefill_tokens"] if prefill_cost else 0.0)

    shares = {}
    for pool in POOLS:
        got = {t: tokens(after[t], pool) - tokens(before[t], pool) for t in after}
        total = sum(got.values())
        shares[pool] = {t: round(n / total, 4) if total else 0.0 for t, n in got.items()}
    return shares


def steps_written(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Each tenant's steps by pool between two usage readings."""
    return {
        tenant: {pool: after[tenant]["pools"][pool]["steps"] - before[tenant]["pools"][pool]["steps"] for pool in POOLS}
        for tenant in after
    }


def large_step_shares(before: dict[str, dict], after: dict[str, dict]) -> dict[str, float | None]:
    """Each tenant's share of its steps the large pool wrote between two usage readings (None: no steps)."""
    out = {}
    for tenant, steps in steps_written(before, after).items():
        total = sum(steps.values())
        out[tenant] = round(steps["large"] / total, 4) if total else None
    return out


def compare_line(fair: dict, fcfs: dict) -> str:
    """The docs' line: the quiet tenant's p95 beside the noisy one over its p95 alone, with and without."""

    def ratio(run: dict) -> str:
        shared, alone = run["shared"]["quiet"]["p95_ms"], run["alone"]["quiet"]["p95_ms"]
        return f"{shared / alone:.2f}x" if shared and alone else "none (no quiet request finished in a phase)"

    return f"quiet tenant p95 under a noisy neighbour: {ratio(fair)} alone ({ratio(fcfs)} without fair shares)"


def metered(samples, tenants: list[dict]) -> dict[str, dict]:
    """Per tenant role, its output tokens, prefilled prompt tokens and steps by pool as the router's counters have
    them (steps counted as they are written, where usage counts a request when it finishes), in the usage
    endpoint's form."""
    from cluster.metrics import SPECS
    from cluster.ops.operators import total

    names = dict(zip(TENANTS, (t["tenant"] for t in tenants), strict=True))
    series = {
        "output_tokens": SPECS["glimprouter_tokens"].exported,
        "prefill_tokens": SPECS["glimprouter_prefill_tokens"].exported,
        "steps": SPECS["glimprouter_steps"].exported,
    }
    return {
        role: {
            "pools": {
                pool: {key: total(samples, name, tenant=tenant, pool=pool) for key, name in series.items()}
                for pool in POOLS
            }
        }
        for role, tenant in names.items()
    }


def _usage(client: httpx.Client, url: str, admin_key: str, tenants: list[dict]) -> dict[str, dict]:
    names = dict(zip(TENANTS, (t["tenant"] for t in tenants), strict=True))
    return {
        role: client.get(
            f"{url}/v1/admin/tenants/{name}/usage", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10
        )
        .raise_for_status()
        .json()
        for role, name in names.items()
    }


def usage_reader(opts, client: httpx.Client, admin_key: str, tenants: list[dict]) -> Callable[[], dict[str, dict]]:
    """What reads each tenant's tokens and steps: the router's counters at ``--metrics-url`` (``auto``: every node
    of the Ray cluster this machine is on), else the admin usage endpoint."""
    if not opts.metrics_url:
        return lambda: _usage(client, opts.url, admin_key, tenants)
    from cluster.ops import operators

    endpoints = operators.metrics_endpoints() if opts.metrics_url == ["auto"] else opts.metrics_url
    return lambda: metered(operators.scrape(endpoints), tenants)


def run_seconds(duration: str) -> float:
    """Seconds of a Locust run time (``180s``, ``3m``, ``1h30m``, or a bare number of seconds). Not Locust's own
    ``parse_timespan``: importing locust monkey-patches this process with gevent, which breaks its subprocess."""
    if re.fullmatch(r"\d+(\.\d+)?", duration):
        return float(duration)
    parts = re.findall(r"(\d+)([hms])", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise ValueError(f"not a Locust run time: {duration!r}")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


def run_phase(
    opts, tenants: list[dict], name: str, noisy_rate: float, at_end: Callable[[], None] | None = None
) -> Path:
    """One Locust run of ``opts.duration``; ``at_end`` is called when that run time is over, before the requests
    still in flight have drained."""
    prefix = opts.out / f"{opts.label}-{name}"
    env = {**os.environ, "GLIMP_QUIET_KEY": tenants[0]["key"], "GLIMP_NOISY_KEY": tenants[1]["key"]}
    cmd = [
        *headless_command(LOCUSTFILE, opts.url, opts.users, opts.duration, opts.stop_timeout, prefix),
        *(
            "--quiet-rate",
            str(opts.quiet_rate),
            "--noisy-rate",
            str(noisy_rate),
            "--quiet-users",
            str(opts.quiet_users),
        ),
        *opts.locust_args,
    ]
    timer, started = threading.Timer(run_seconds(opts.duration), at_end) if at_end else None, False
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) as locust:
        try:
            for line in locust.stderr:  # Locust's log; its run time starts as its users are spawned
                sys.stderr.write(line)
                if timer and not started and SPAWNED in line:
                    timer.start()
                    started = True
            rc = locust.wait()
        finally:
            if started:
                timer.cancel()
                timer.join()  # a reading under way finishes first
    stats = Path(f"{prefix}_stats.csv")
    if rc not in (0, 1) or not stats.exists():
        raise SystemExit(f"locust failed in phase {name} (exit {rc})")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FAIR_JSON", "FCFS_JSON"))
    parser.add_argument("--url")
    parser.add_argument("--tenants-file", type=Path)
    parser.add_argument("--admin-key-file", type=Path)
    parser.add_argument("--quiet-rate", type=float, default=0.2)
    parser.add_argument("--noisy-rate", type=float, default=1.6)
    parser.add_argument("--users", type=int, default=32, help="users in all (the quiet tenant's, the rest noisy)")
    parser.add_argument("--quiet-users", type=int, default=8)
    parser.add_argument("--duration", default="180s")
    parser.add_argument("--stop-timeout", default="300s")
    parser.add_argument("--label", default="run")
    parser.add_argument(
        "--metrics-url",
        action="append",
        help="a Prometheus endpoint of the cluster (again for each node; 'auto': the local Ray cluster's): "
        "shares from the router's counters, step by step, instead of usage (counted as requests finish)",
    )
    parser.add_argument(
        "--prefill-token-cost",
        type=float,
        default=FairnessSettings().prefill_token_cost,
        help="with --metrics-url, the cluster's router.fairness.prefill_token_cost: the charged shares count each "
        "prefilled prompt token at this many output tokens (default: the setting's default)",
    )
    parser.add_argument(
        "--shared-only", action="store_true", help="run only the shared phase (shares and classes under saturation)"
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("locust_args", nargs="*", help="after --: more locustfile options (priorities, budgets)")
    opts = parser.parse_args(argv)
    if opts.compare:
        fair, fcfs = (json.loads(p.read_text()) for p in opts.compare)
        print(compare_line(fair, fcfs))
        return 0
    if not (opts.url and opts.tenants_file and opts.admin_key_file):
        parser.error("--url, --tenants-file and --admin-key-file are needed (or --compare)")
    tenants = read_tenants(opts.tenants_file.read_text())
    admin_key = opts.admin_key_file.read_text().strip()
    opts.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "label": opts.label,
        "quiet_rate": opts.quiet_rate,
        "noisy_rate": opts.noisy_rate,
        "duration": opts.duration,
    }
    with httpx.Client() as client:
        if not opts.shared_only:
            summary["alone"] = tenant_stats(run_phase(opts, tenants, "alone", 0.0))
        read = usage_reader(opts, client, admin_key, tenants)
        before, at_end = read(), {}
        summary["shares_from"] = "router metrics" if opts.metrics_url else "usage (finished requests)"
        summary["shared"] = tenant_stats(
            run_phase(opts, tenants, "shared", opts.noisy_rate, lambda: at_end.update(read()))
        )
        after = read()
        summary["token_shares"] = token_shares(before, at_end or after)  # over the run time, without the drain
        summary["token_shares_with_drain"] = token_shares(before, after)
        if opts.metrics_url:  # the fair queue's own measure: output tokens and prefilled prompt tokens at its cost
            summary["prefill_token_cost"] = opts.prefill_token_cost
            summary["charged_shares"] = token_shares(before, at_end or after, opts.prefill_token_cost)
            summary["charged_shares_with_drain"] = token_shares(before, after, opts.prefill_token_cost)
        summary["large_step_shares"] = large_step_shares(before, at_end or after)
        summary["steps"] = steps_written(before, at_end or after)
    (opts.out / f"{opts.label}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
