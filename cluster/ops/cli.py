"""``python -m cluster``: the local cluster and the operators' commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cluster.config import ConfigError, load_config
from cluster.ops import operators, plan, render, tenants_cli

SAMPLE_PROMPT = "A farmer has 17 sheep. All but 9 run away. How many sheep are left? Think step by step."


def sample_request(base: str, key: str, model: str) -> dict:
    """Send one chat completion and return the response JSON."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": SAMPLE_PROMPT}], "temperature": 0}
    response = httpx.post(
        f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600
    )
    response.raise_for_status()
    return response.json()


def print_sample(result: dict) -> None:
    """A short human-readable view of a response."""
    msg = result["choices"][0]["message"]
    routing = result["routing"]
    print("\n--- sample request ---")
    print(f"prompt:    {SAMPLE_PROMPT}")
    print(f"reasoning: {msg['reasoning_content'][:400]!r}")
    print(f"answer:    {msg['content'][:400]!r}")
    print(
        "steps:     "
        + ", ".join(
            f"{s['pool']}(H={s['entropy'] if s['entropy'] is None else round(s['entropy'], 2)})"
            for s in routing["steps"]
        )
    )
    print(f"large-step fraction {routing['large_step_fraction']}; usage {json.dumps(result['usage']['per_pool'])}")


def ensure_demo_key(cfg, run_dir) -> str:
    """The key of tenant ``demo`` (created with the router's default policy), kept in ``run_dir/demo.key``."""
    import asyncio

    import redis.asyncio as aioredis

    from router_service.tenancy import TenantSettings, TenantStore

    key_file = run_dir / "demo.key"

    async def run() -> str:
        client = aioredis.Redis.from_url(cfg.redis.url)
        try:
            store = TenantStore(client)
            if key_file.exists() and await store.authenticate(key_file.read_text().strip()):
                return key_file.read_text().strip()
            if await store.get_tenant("demo") is None:
                _, key = await store.create_tenant("demo", TenantSettings(policy=cfg.router.policy))
            else:
                key = await store.create_key("demo")
            key_file.write_text(key)
            key_file.chmod(0o600)
            return key
        finally:
            await client.aclose()

    return asyncio.run(run())


def cmd_up(args) -> int:
    from cluster.ops import launcher

    cfg = load_config(args.config)
    start = time.time()
    base = launcher.up(cfg, num_cpus=args.num_cpus)
    key = ensure_demo_key(cfg, launcher.RUN_DIR)
    launcher.say(f"demo tenant key in {launcher.RUN_DIR / 'demo.key'}; cluster up in {time.time() - start:.0f} s")
    if args.sample:
        print_sample(sample_request(base, key, cfg.name))
    print(f"\nAPI: {base}/v1   model: {cfg.name}   stop with: python -m cluster down")
    return 0


def cmd_down(args) -> int:
    from cluster.ops import launcher

    launcher.down()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="start Redis, Ray and the Serve application")
    p.add_argument("--config", default=os.environ.get("GLIMP_CONFIG", "local"), help="YAML file or shipped name")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray node")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip the sample request")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the local cluster")
    p.set_defaults(func=cmd_down)
    tenants_cli.register(sub)
    render.register(sub)
    plan.register(sub)
    plan.register_predict(sub)
    operators.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
