"""``tenants`` commands of the operators' CLI: create tenants, manage their API keys, read their usage.

The main CLI calls ``register(subparsers)``; each parsed command carries ``func(args) -> exit code``.
Standalone: ``python -m cluster.ops.tenants_cli tenants create acme --rpm 120``.
A new key's plaintext is printed once, on stdout; listings show key prefixes only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from typing import get_args

from cluster.config import PRIORITY_CLASSES, PolicyName
from router_service.tenancy import USAGE_FIELDS, TenancyError, TenantSettings, TenantStore, key_prefix

DEFAULT_REDIS_URL = "redis://127.0.0.1:6390/0"

# CLI option -> settings field; --policy and --tau go into the nested policy, --models into allowed_models.
_LIMIT_OPTIONS = {
    "rpm": "requests_per_minute",
    "tpm_small": "tokens_per_minute_small",
    "tpm_large": "tokens_per_minute_large",
    "concurrent": "max_concurrent_requests",
    "max_token_budget": "max_token_budget",
    "tau_floor": "tau_floor",
    "tau_ceiling": "tau_ceiling",
    "weight": "weight",
    "priority": "priority",
}


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``tenants`` command group to an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--redis-url", help=f"Redis holding the tenants (default: REDIS_URL, else {DEFAULT_REDIS_URL})")
    common.add_argument("--namespace", default="glimp", help="Redis key namespace (default: %(default)s)")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    limits = argparse.ArgumentParser(add_help=False)
    limits.add_argument("--rpm", type=int, help="requests per minute")
    limits.add_argument("--tpm-small", type=int, help="small-pool tokens per minute")
    limits.add_argument("--tpm-large", type=int, help="large-pool tokens per minute")
    limits.add_argument("--concurrent", type=int, help="concurrent requests")
    limits.add_argument("--max-token-budget", type=int, help="ceiling on a request's token budget")
    limits.add_argument("--policy", choices=get_args(PolicyName), help="default policy")
    limits.add_argument("--tau", type=float, help="default entropy threshold")
    limits.add_argument("--models", help="comma-separated allowed models ('' allows all)")
    limits.add_argument("--tau-floor", type=float, help="load-aware tau never below this")
    limits.add_argument("--tau-ceiling", type=float, help="load-aware tau never above this")
    limits.add_argument("--weight", type=float, help="fair share under saturation (relative to other tenants)")
    limits.add_argument("--priority", choices=PRIORITY_CLASSES, help="class of the tenant's requests and their ceiling")
    limits.add_argument(
        "--max-large-fraction",
        type=float,
        help="large-step budget: share of steps sent to the large pool (the tau steers to it)",
    )

    group = subparsers.add_parser("tenants", help="manage tenants, API keys and usage")
    cmds = group.add_subparsers(dest="tenants_cmd", required=True)
    cmds.add_parser("create", parents=[common, limits], help="create a tenant and print its first key").add_argument(
        "name"
    )
    cmds.add_parser("list", parents=[common], help="list tenants")
    cmds.add_parser("show", parents=[common], help="a tenant's settings and keys").add_argument("name")
    cmds.add_parser("set", parents=[common, limits], help="change a tenant's settings").add_argument("name")
    cmds.add_parser("delete", parents=[common], help="delete a tenant, its keys and data").add_argument("name")
    cmds.add_parser("keys", parents=[common], help="list a tenant's key prefixes").add_argument("name")
    cmds.add_parser("add-key", parents=[common], help="create another key and print it").add_argument("name")
    rotate = cmds.add_parser("rotate", parents=[common], help="replace a key by a new one (printed)")
    rotate.add_argument("name")
    rotate.add_argument("prefix")
    cmds.add_parser("revoke", parents=[common], help="revoke a key at once").add_argument("prefix")
    usage = cmds.add_parser("usage", parents=[common], help="a tenant's usage of one UTC day")
    usage.add_argument("name")
    usage.add_argument("--day", help="YYYY-MM-DD (default: today, UTC)")
    group.set_defaults(func=run)
    return group


def _changes(args) -> dict:
    """The settings given on the command line, as a partial settings dict."""
    changes = {field: getattr(args, opt) for opt, field in _LIMIT_OPTIONS.items() if getattr(args, opt) is not None}
    policy = {k: getattr(args, k) for k in ("policy", "tau", "max_large_fraction") if getattr(args, k) is not None}
    if policy:
        changes["policy"] = policy
    if args.models is not None:
        changes["allowed_models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    return changes


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in cells)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _settings_rows(settings: TenantSettings) -> list[list]:
    return [[k, v] for k, v in settings.model_dump().items()]


async def _dispatch(args, store: TenantStore) -> tuple[object, str]:
    """Run one command; returns what it prints: (JSON-able data, table text)."""
    cmd = args.tenants_cmd
    if cmd == "create":
        tenant, key = await store.create_tenant(args.name, TenantSettings.model_validate(_changes(args)))
        data = {"tenant": tenant.name, "key": key, "prefix": key_prefix(key)}
        return data, f"created tenant {tenant.name}\napi key (shown once, store it now): {key}"
    if cmd == "list":
        tenants = await store.list_tenants()
        rows = [
            [
                t.name,
                t.settings.requests_per_minute,
                t.settings.tokens_per_minute_small,
                t.settings.tokens_per_minute_large,
                t.settings.max_concurrent_requests,
                t.settings.policy.policy,
                t.settings.policy.tau,
                t.settings.weight,
                t.settings.priority,
                ",".join(t.settings.allowed_models) or "*",
            ]
            for t in tenants
        ]
        header = [
            "tenant",
            "rpm",
            "tpm_small",
            "tpm_large",
            "concurrent",
            "policy",
            "tau",
            "weight",
            "priority",
            "models",
        ]
        return [t.model_dump() for t in tenants], _table(rows, header)
    if cmd in ("show", "keys"):
        tenant = await store.require_tenant(args.name)
        keys = [{"prefix": k.prefix, "created": _iso(k.created)} for k in await store.list_keys(tenant)]
        key_table = _table([[k["prefix"], k["created"]] for k in keys], ["prefix", "created"])
        if cmd == "keys":
            return keys, key_table
        data = {**tenant.model_dump(), "keys": keys}
        return data, _table(_settings_rows(tenant.settings), ["setting", "value"]) + "\n\n" + key_table
    if cmd == "set":
        tenant = await store.update_settings(args.name, _changes(args))
        return tenant.model_dump(), _table(_settings_rows(tenant.settings), ["setting", "value"])
    if cmd == "delete":
        await store.delete_tenant(args.name)
        return {"deleted": args.name}, f"deleted tenant {args.name}"
    if cmd in ("add-key", "rotate"):
        key = await (store.create_key(args.name) if cmd == "add-key" else store.rotate_key(args.name, args.prefix))
        return {"tenant": args.name, "key": key}, f"api key (shown once, store it now): {key}"
    if cmd == "revoke":
        owner = await store.revoke_key(args.prefix)
        return {"revoked": args.prefix, "tenant": owner}, f"revoked {args.prefix} of tenant {owner}"
    if cmd == "usage":
        await store.require_tenant(args.name)
        data = await store.usage(args.name, args.day)
        rows = [[pool, *(counts[f] for f in USAGE_FIELDS)] for pool, counts in data["pools"].items()]
        rows.append(["total", *(sum(c[f] for c in data["pools"].values()) for f in USAGE_FIELDS)])
        text = (
            f"tenant {data['tenant']}  day {data['day']} (UTC)\n"
            + _table(rows, ["pool", *USAGE_FIELDS])
            + f"\nlarge_step_fraction {data['large_step_fraction']:.3f}"
        )
        budget = (await store.require_tenant(args.name)).settings.policy.max_large_fraction
        if budget is not None:
            text += f" (budget max_large_fraction {budget:.3f})"
        return data, text
    raise ValueError(f"unknown tenants command {cmd!r}")


async def _run(args) -> int:
    import redis.asyncio as aioredis

    url = args.redis_url or os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    client = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=5)
    try:
        data, text = await _dispatch(args, TenantStore(client, args.namespace))
    finally:
        await client.aclose()
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def run(args) -> int:
    """Run a parsed ``tenants`` command; exit code 0, 1 on a tenancy error, 2 if Redis is unreachable."""
    import redis

    try:
        return asyncio.run(_run(args))
    except (TenancyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except redis.RedisError as exc:
        print(f"error: Redis: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m cluster.ops.tenants_cli tenants ...``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.ops.tenants_cli", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
