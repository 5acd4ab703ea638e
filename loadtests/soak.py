"""Soak: a steady Locust load for a long time while the memory of every replica is sampled.

    python -m loadtests.soak --url http://127.0.0.1:8000 --keys-file keys.txt --duration 10m --arrival-rate 0.05

Runs one glimprouter scenario through ``loadtests.run`` (open loop) and, every ``--every`` seconds, the
resident memory of each Serve replica of the application with its child processes (the vLLM engine
cores); prints the memory at start, middle and end per deployment and the failed requests. Recorded in
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from cluster.ops.operators import serve_details


def replica_memory(app: str) -> dict[str, float]:
    """GiB resident per deployment: its replicas' processes and their children."""
    used: dict[str, float] = {}
    for name, deployment in serve_details()["applications"][app]["deployments"].items():
        total = 0
        for replica in deployment["replicas"]:
            try:
                proc = psutil.Process(replica["pid"])
                total += sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
            except psutil.NoSuchProcess:
                continue
        used[name] = total / 2**30
    return used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--keys-file", required=True)
    parser.add_argument("--duration", default="10m")
    parser.add_argument("--arrival-rate", default="0.05")
    parser.add_argument("--users", default="4")
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--app", default="glimprouter")
    parser.add_argument("--out", default="results/soak")
    args = parser.parse_args()
    samples: list[tuple[float, dict[str, float]]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.time()
        while not done.is_set():
            samples.append((time.time() - start, replica_memory(args.app)))
            done.wait(args.every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.run",
            "--url",
            args.url,
            "--keys-file",
            args.keys_file,
            "--scenario",
            "glimprouter",
            "--duration",
            args.duration,
            "--users",
            args.users,
            "--arrival-rate",
            args.arrival_rate,
            "--stream",
            "mixed",
            "--out",
            args.out,
        ]
    )
    done.set()
    sampler.join()
    samples.append((samples[-1][0] + args.every, replica_memory(args.app)))
    with open(Path(args.out) / "glimprouter_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    # successes are "/v1/chat/completions"; each failure is an "HTTP <status>" entry: all count in Aggregated
    print(
        f"\nrequests {rows['/v1/chat/completions']['Request Count']} succeeded, "
        f"{rows['Aggregated']['Failure Count']} failed"
    )
    print(
        "| deployment | "
        + " | ".join(f"{t:.0f} s" for t, _ in (samples[0], samples[len(samples) // 2], samples[-1]))
        + " |\n|---|---|---|---|"
    )
    for name in samples[0][1]:
        print(
            f"| {name} | "
            + " | ".join(f"{m[name]:.2f} GiB" for _, m in (samples[0], samples[len(samples) // 2], samples[-1]))
            + " |"
        )
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
