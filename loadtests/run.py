"""Run the Locust load test headless for one or several scenarios; plot latency over time; print a summary.

    python -m loadtests.run --url http://127.0.0.1:8000 --scenario glimprouter:tau=1.0 --scenario large_only \\
        --scenario small_only --duration 60s [--users 4] [--arrival-rate 0.5] [--keys-file keys.txt] --out results/

A scenario is a policy with optional ``key=value`` overrides (tau, stream, token_budget, step_max_tokens,
arrival_rate), e.g. ``glimprouter:tau=1.0,stream=true``. Per scenario NAME it writes Locust's CSVs
(``NAME_stats.csv``, ``NAME_stats_history.csv`` with every entry, ``NAME_failures.csv``) and ``NAME.html``
under ``--out``, then ``latency.png`` (p50/p95 of successful requests over time, Locust's rolling
10 s window) and a table. Keys: ``--keys-file`` (one a line, or what ``tenants create --json`` prints), else
``GLIMP_API_KEYS`` from the environment.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from loadtests import metrics
from loadtests.keys import api_keys
from loadtests.locust_support import headless_command

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
REQUEST = ("POST", "/v1/chat/completions")
SCENARIO_KEYS = {"tau", "stream", "token_budget", "step_max_tokens", "arrival_rate"}
MOSTLY_FAILED = 0.5  # a scenario with more failed requests than this fraction (or none at all) fails the run
COLUMNS = ["requests", "failures", "req/s", "p50 ms", "p95 ms", "p50 TTFT ms", "large %", "small tok/s", "large tok/s"]


def parse_scenario(spec: str) -> tuple[str, list[str]]:
    """``policy[:key=value,...]`` as (file-safe name, locustfile arguments)."""
    policy, _, rest = spec.partition(":")
    name, args = policy, ["--policy", policy]
    for pair in filter(None, rest.split(",")):
        key, _, value = pair.partition("=")
        if key not in SCENARIO_KEYS or not value:
            raise ValueError(f"bad scenario setting {pair!r} in {spec!r} (keys: {', '.join(sorted(SCENARIO_KEYS))})")
        name += f"-{key}{value}"
        args += [f"--{key.replace('_', '-')}", value]
    return name, args


def locust_command(opts: argparse.Namespace, name: str, scenario_args: list[str]) -> list[str]:
    """The headless Locust command of one scenario (scenario settings last, so they override)."""
    prefix = opts.out / name
    common = ["--stream", opts.stream, "--arrival-rate", str(opts.arrival_rate), "--model", opts.model]
    for flag, value in (("--token-budget", opts.token_budget), ("--step-max-tokens", opts.step_max_tokens)):
        if value is not None:
            common += [flag, str(value)]
    base = headless_command(LOCUSTFILE, opts.url, opts.users, opts.duration, opts.stop_timeout, prefix)
    return [*base, "--csv-full-history", "--html", f"{prefix}.html", *common, *scenario_args]


def _number(value: str | None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summarize(stats_csv: Path) -> dict[str, float | None]:
    """A scenario's summary row from Locust's ``_stats.csv``."""
    with open(stats_csv) as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f) if r["Name"] != "Aggregated"}

    def get(key: tuple[str, str], column: str) -> float | None:
        return _number(rows.get(key, {}).get(column))

    failures = sum(int(r["Failure Count"]) for r in rows.values())
    return {
        "requests": (get(REQUEST, "Request Count") or 0) + failures,
        "failures": failures,
        "req/s": get(REQUEST, "Requests/s"),
        "p50 ms": get(REQUEST, "50%"),
        "p95 ms": get(REQUEST, "95%"),
        "p50 TTFT ms": get(("metric", metrics.TTFT), "50%"),
        "large %": get(("metric", metrics.LARGE_PERCENT), "Average Response Time"),
        **{
            f"{pool} tok/s": get(("metric", name), "Average Response Time")
            for pool, name in metrics.TOKENS_PER_S.items()
        },
    }


def table(summaries: dict[str, dict]) -> str:
    """The summaries as a fixed-width text table."""
    width = max(len("scenario"), *map(len, summaries))
    lines = ["scenario".ljust(width) + "".join(c.rjust(13) for c in COLUMNS)]
    for name, row in summaries.items():
        cells = (
            "-" if row[c] is None else f"{row[c]:.0f}" if c in ("requests", "failures") else f"{row[c]:.2f}"
            for c in COLUMNS
        )
        lines.append(name.ljust(width) + "".join(cell.rjust(13) for cell in cells))
    return "\n".join(lines)


def plot(histories: dict[str, Path], png: Path) -> None:
    """p50 (solid) and p95 (dashed) request latency over time, one colour per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name, path in histories.items():
        with open(path) as f:
            rows = list(csv.DictReader(f))
        t0 = min((int(r["Timestamp"]) for r in rows), default=0)
        points = [
            (int(r["Timestamp"]) - t0, _number(r["50%"]), _number(r["95%"]))
            for r in rows
            if (r["Type"], r["Name"]) == REQUEST and _number(r["50%"])
        ]  # 0: window not filled
        seconds = [p[0] for p in points]
        (p50,) = ax.plot(seconds, [p[1] / 1000 for p in points], label=f"{name} p50")
        ax.plot(seconds, [p[2] / 1000 for p in points], color=p50.get_color(), linestyle="--", label=f"{name} p95")
    ax.set(
        xlabel="time since start (s)",
        ylabel="request latency (s)",
        title="Chat completion latency (Locust's 10 s window)",
    )
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the API's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--scenario", action="append", required=True, help="policy[:key=value,...]; repeatable")
    parser.add_argument("--duration", default="60s", help="Locust run time per scenario")
    parser.add_argument("--stop-timeout", default="60s", help="time in-flight requests get to finish after --duration")
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--arrival-rate", type=float, default=0.0, help="requests/s (open loop); 0: closed loop")
    parser.add_argument("--stream", choices=["true", "false", "mixed"], default="mixed")
    parser.add_argument("--token-budget", type=int)
    parser.add_argument("--step-max-tokens", type=int)
    parser.add_argument("--model", default="glimprouter")
    parser.add_argument(
        "--keys-file", type=Path, help="tenant keys, one a line or `tenants create --json` output (else GLIMP_API_KEYS)"
    )
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--fail-on-errors",
        action="store_true",
        help="exit 1 if any request failed (it exits 1 anyway when a scenario's requests mostly fail)",
    )
    opts = parser.parse_args(argv)
    try:
        scenarios = [parse_scenario(spec) for spec in opts.scenario]
    except ValueError as exc:
        parser.error(str(exc))
    env = dict(os.environ)
    if opts.keys_file:  # the locustfile prefers GLIMP_API_KEYS to the file
        env.pop("GLIMP_API_KEYS", None)
        env["GLIMP_KEYS_FILE"] = str(opts.keys_file.resolve())
    try:
        if not api_keys(env):
            parser.error("no API keys: give --keys-file or set GLIMP_API_KEYS")
    except (OSError, ValueError) as exc:
        parser.error(f"--keys-file: {exc}")
    opts.out.mkdir(parents=True, exist_ok=True)

    summaries, histories = {}, {}
    for name, scenario_args in scenarios:
        print(f"== scenario {name}", flush=True)
        stats = opts.out / f"{name}_stats.csv"
        stats.unlink(missing_ok=True)
        rc = subprocess.run(locust_command(opts, name, scenario_args), env=env).returncode
        if rc not in (0, 1) or not stats.exists():  # Locust exits 1 when some request failed
            print(f"locust failed for scenario {name} (exit {rc})", file=sys.stderr)
            return 2
        summaries[name], histories[name] = summarize(stats), opts.out / f"{name}_stats_history.csv"
    plot(histories, opts.out / "latency.png")
    print(table(summaries))
    print(f"results in {opts.out}/ (latency.png, <scenario>.html, <scenario>_stats*.csv)")
    mostly_failed = [
        name
        for name, row in summaries.items()
        if not row["requests"] or row["failures"] > MOSTLY_FAILED * row["requests"]
    ]
    if mostly_failed:
        print(
            f"scenarios whose requests mostly failed: {', '.join(mostly_failed)} (see <scenario>_failures.csv)",
            file=sys.stderr,
        )
        return 1
    failed = any(row["failures"] for row in summaries.values())
    return 1 if opts.fail_on_errors and failed else 0


if __name__ == "__main__":
    sys.exit(main())
