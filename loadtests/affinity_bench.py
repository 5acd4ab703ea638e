"""vLLM prefix-cache hit rate with two replicas per pool, with and without request affinity.

    python -m loadtests.affinity_bench [--config local] [--requests 16] [--concurrency 4] \
        [--model-for-both smollm2-135m-instruct]

For each arm (affinity off, then on) it starts the local cluster from ``--config`` with both pools
pinned at two replicas and ``router.prefix_affinity`` set, sends the same requests through the API,
and prints each pool's hit rate: prompt tokens the engines found in their prefix cache over all prompt
tokens of its steps and final answers (engine-reported, from each response's ``usage.per_pool``).
``--model-for-both`` runs one embedded model in both pools, so four replicas fit this machine's memory; routing is
unchanged.
Recorded in docs/local-cluster.md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from cluster.config import load_config
from cluster.ops.launcher import RUN_DIR
from cluster.ops.problems import problems


def arm_config(base: str, affinity: bool, model_for_both: str | None) -> Path:
    """A config file for one arm: two replicas per pool, affinity on or off."""
    data = load_config(base).model_dump(mode="json", exclude_none=True)
    data["router"]["prefix_affinity"] = affinity
    for pool in data["pools"].values():
        pool["autoscaling"].update(min_replicas=2, max_replicas=2, initial_replicas=2)
        if model_for_both:
            pool["model"] = {"embedded": model_for_both}
    path = RUN_DIR / f"affinity-{'on' if affinity else 'off'}.yaml"
    RUN_DIR.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def drive(base_url: str, key: str, model: str, requests: int, concurrency: int) -> dict:
    """Send the bundled problems (greedy, glimprouter at tau 1.0: a glimpse on the small pool before each
    step, then the step on the chosen pool); sum the steps' engine-reported usage."""
    totals = {pool: {"prompt_tokens": 0, "cached_prompt_tokens": 0, "steps": 0} for pool in ("small", "large")}
    gate = asyncio.Semaphore(concurrency)
    prompts = problems(requests)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": model,
            "temperature": 0,
            "policy": "glimprouter",
            "tau": 1.0,
            "token_budget": 320,
            "step_max_tokens": 64,
            "messages": [{"role": "user", "content": prompts[i]}],
        }
        async with gate:
            response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"request {i}: {response.status_code} {response.text}")
        for pool, used in response.json()["usage"]["per_pool"].items():
            for field in totals[pool]:
                totals[pool][field] += used[field]

    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=900) as client:
        await asyncio.gather(*(one(client, i) for i in range(requests)))
    return totals


def run_arm(config_path: Path, requests: int, concurrency: int) -> dict:
    """Start the cluster of one arm, drive it, stop it."""
    cluster = [sys.executable, "-m", "cluster"]
    subprocess.run([*cluster, "down"], check=False)
    subprocess.run([*cluster, "up", "--no-sample", "--config", str(config_path)], check=True)
    try:
        cfg = load_config(config_path)
        key = (RUN_DIR / "demo.key").read_text().strip()
        return asyncio.run(drive(f"http://127.0.0.1:{cfg.router.port}", key, cfg.name, requests, concurrency))
    finally:
        subprocess.run([*cluster, "down"], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="local")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model-for-both", default="smollm2-135m-instruct")
    args = parser.parse_args()
    rows = []
    for affinity in (False, True):
        totals = run_arm(
            arm_config(args.config, affinity, args.model_for_both or None), args.requests, args.concurrency
        )
        for pool, t in totals.items():
            rate = t["cached_prompt_tokens"] / t["prompt_tokens"] if t["prompt_tokens"] else 0.0
            rows.append(
                f"| {'on' if affinity else 'off'} | {pool} | {t['steps']} | {t['prompt_tokens']} "
                f"| {t['cached_prompt_tokens']} | {rate:.1%} |"
            )
    print("\n| affinity | pool | steps | prompt tokens | cached | hit rate |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
