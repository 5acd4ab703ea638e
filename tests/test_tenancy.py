"""Tenancy on a real Redis: keys, revocation across replicas, atomic limits, usage, no plaintext keys."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from cluster.ops import tenants_cli
from router_service.headers import ratelimit_headers, refusal_headers
from router_service.tenancy import (
    InvalidTenantName,
    KeyNotFound,
    RateLimited,
    Tenant,
    TenantExists,
    TenantNotFound,
    TenantSettings,
    TenantStore,
    is_admin_key,
    key_prefix,
)

pytestmark = pytest.mark.redis
REPO = Path(__file__).resolve().parents[1]
LONG_WINDOW = 3600.0  # exact-count tests must not straddle a window boundary


@pytest.fixture
async def store(redis_client):
    return TenantStore(redis_client, window_s=LONG_WINDOW)


@pytest.fixture
async def replicas(redis_url, redis_client):
    """Factory of stores on their own Redis clients, as separate router replicas would have."""
    clients = []

    def make(**kwargs) -> TenantStore:
        client = aioredis.Redis.from_url(redis_url)
        clients.append(client)
        return TenantStore(client, **kwargs)

    yield make
    for client in clients:
        await client.aclose()


async def redis_dump(client) -> str:
    """Every key name and value in the database, as one text."""
    parts = []
    for key in await client.keys("*"):
        kind = (await client.type(key)).decode()
        value = {
            "string": client.get,
            "hash": client.hgetall,
            "set": client.smembers,
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "list": lambda k: client.lrange(k, 0, -1),
        }[kind]
        parts.append(f"{key!r} {await value(key)!r}")
    return "\n".join(parts)


# -- names, settings, admin key ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["acme", "a", "0team", "a-b_c", "x" * 63])
async def test_valid_tenant_names(store, name):
    tenant, _ = await store.create_tenant(name)
    assert (await store.get_tenant(name)) == tenant


@pytest.mark.parametrize("name", ["", "Acme", "-acme", "_a", "a b", "a:b", "a*", "x" * 64, "é"])
async def test_invalid_tenant_names(store, redis_client, name):
    with pytest.raises(InvalidTenantName):
        await store.create_tenant(name)
    with pytest.raises(ValidationError):
        Tenant(name=name)
    assert await redis_client.keys("*") == []


def test_settings_bounds_and_models():
    with pytest.raises(ValidationError):
        TenantSettings(requests_per_minute=0)
    with pytest.raises(ValidationError):
        TenantSettings(unknown=1)
    assert TenantSettings().allows_model("anything")
    assert not TenantSettings(allowed_models=["a"]).allows_model("b")


def test_admin_key(monkeypatch):
    monkeypatch.delenv("GLIMP_ADMIN_KEY", raising=False)
    assert not is_admin_key("") and not is_admin_key(None)
    monkeypatch.setenv("GLIMP_ADMIN_KEY", "s3cret-admin")
    assert is_admin_key("s3cret-admin")
    assert not is_admin_key("s3cret-admin ") and not is_admin_key(None)


# -- tenants and keys -------------------------------------------------------------------------------


async def test_tenant_lifecycle(store, redis_client):
    tenant, key = await store.create_tenant("acme", TenantSettings(requests_per_minute=7, allowed_models=["m"]))
    assert tenant.settings.requests_per_minute == 7
    with pytest.raises(TenantExists):
        await store.create_tenant("acme")
    await store.create_tenant("beta")
    assert [t.name for t in await store.list_tenants()] == ["acme", "beta"]

    updated = await store.update_settings("acme", {"policy": {"tau": 0.5}, "max_concurrent_requests": 3})
    assert (updated.settings.policy.tau, updated.settings.policy.policy) == (0.5, "glimprouter")
    assert (await store.get_tenant("acme")).settings.max_concurrent_requests == 3
    assert (await store.get_tenant("acme")).settings.requests_per_minute == 7
    with pytest.raises(ValidationError):
        await store.update_settings("acme", {"requests_per_minute": -1})
    with pytest.raises(TenantNotFound):
        await store.update_settings("nobody", {"requests_per_minute": 1})

    base = store.request_key_prefix("acme")
    assert base == "glimp:t:acme:req:" and store.request_key_prefix("beta") != base
    await redis_client.set(base + "r1", "state")
    await store.record_usage("acme", "small", requests=1)
    await store.delete_tenant("acme")
    assert await store.get_tenant("acme") is None
    assert await store.authenticate(key) is None
    assert await redis_client.keys("glimp:t:acme:*") == []
    assert [t.name for t in await store.list_tenants()] == ["beta"]


async def test_authenticate(store):
    tenant, key = await store.create_tenant("acme")
    prefix = key_prefix(key)
    assert prefix and prefix.startswith("gr-") and len(prefix) == 11 and key.startswith(prefix + "-")
    assert await store.authenticate(key) == tenant
    assert await store.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await store.authenticate(prefix + "-" + "x" * 43) is None
    for bad in ("", None, "Bearer " + key, key + "\n", "gr-zzzzzzzz-" + "x" * 43):
        assert await store.authenticate(bad) is None
    second = await store.create_key(tenant)
    assert await store.authenticate(second) == tenant
    assert [k.prefix for k in await store.list_keys("acme")] == [prefix, key_prefix(second)]


async def test_revoked_key_refused_at_once_on_every_replica(store, replicas):
    tenant, key = await store.create_tenant("acme")
    replica_a, replica_b = replicas(), replicas()
    assert await replica_a.authenticate(key) == tenant
    assert await replica_b.authenticate(key) == tenant

    assert await replica_a.revoke_key(key_prefix(key)) == "acme"
    assert await replica_a.authenticate(key) is None
    assert await replica_b.authenticate(key) is None
    assert await store.list_keys("acme") == []
    with pytest.raises(KeyNotFound):
        await replica_b.revoke_key(key_prefix(key))


async def test_rotate_key(store, replicas):
    _, old = await store.create_tenant("acme")
    await store.create_tenant("beta")
    with pytest.raises(KeyNotFound):
        await store.rotate_key("beta", key_prefix(old))
    new = await store.rotate_key("acme", key_prefix(old))
    for replica in (replicas(), replicas()):
        assert await replica.authenticate(old) is None
        assert (await replica.authenticate(new)).name == "acme"
    assert [k.prefix for k in await store.list_keys("acme")] == [key_prefix(new)]


async def test_plaintext_key_never_in_redis_logs_or_errors(store, redis_client, caplog):
    caplog.set_level(logging.DEBUG)
    tenant, key = await store.create_tenant("acme", TenantSettings(requests_per_minute=1))
    keys = [key, await store.create_key("acme")]
    keys.append(await store.rotate_key("acme", key_prefix(keys[1])))
    errors = []
    for attempt in (keys[0][:-2] + "zz", keys[1], "gr-00000000-" + keys[0][12:]):
        assert await store.authenticate(attempt) is None
    for call in (
        lambda: store.rotate_key("beta", key_prefix(keys[0])),
        lambda: store.revoke_key(keys[1]),
        lambda: store.revoke_key(key_prefix(keys[1])),
    ):
        with pytest.raises(Exception) as info:
            await call()
        errors.append(str(info.value))
    await store.admit(tenant, "r1")
    with pytest.raises(RateLimited) as limited:
        await store.admit(tenant, "r2")
    errors.append(str(limited.value) + json.dumps(refusal_headers(limited.value)))
    await store.record_usage("acme", "large", requests=1, steps=2)

    dump = await redis_dump(redis_client)
    assert "acme" in dump and key_prefix(keys[0]) in dump  # the scan does see the data
    texts = {"redis": dump, "logs": caplog.text, "errors": "\n".join(errors)}
    for plain in keys:
        secret = plain[len(key_prefix(plain)) + 1 :]
        for where, text in texts.items():
            assert secret not in text, f"a key's secret appears in {where}"


# -- limits -----------------------------------------------------------------------------------------


async def test_fifty_concurrent_admits_against_limit_ten(store, replicas):
    tenant, _ = await store.create_tenant("acme", TenantSettings(max_concurrent_requests=10, requests_per_minute=1000))
    stores = [replicas(window_s=LONG_WINDOW) for _ in range(50)]

    async def attempt(i: int):
        try:
            return await stores[i].admit(tenant, f"req-{i}")
        except RateLimited as exc:
            return exc

    results = await asyncio.gather(*(attempt(i) for i in range(50)))
    admitted = [r for r in results if not isinstance(r, RateLimited)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 10 and len(refused) == 40
    assert {r.reason for r in refused} == {"concurrency"}
    assert all(0 < r.retry_after_s <= 1 and refusal_headers(r)["Retry-After"] == "1" for r in refused)

    with pytest.raises(RateLimited):
        await store.admit(tenant, "late")
    await store.release(tenant, admitted[0].request_id)
    assert (await store.admit(tenant, "late")).request_id == "late"


async def test_requests_per_minute_admits_exactly_n(store):
    n = 5
    tenant, _ = await store.create_tenant("acme", TenantSettings(requests_per_minute=n, tokens_per_minute_large=100))
    for i in range(n):
        admission = await store.admit(tenant, f"r{i}")
        headers = ratelimit_headers(admission.state)
        assert headers["x-ratelimit-limit-requests"] == str(n)
        assert headers["x-ratelimit-remaining-requests"] == str(n - 1 - i)
        assert headers["x-ratelimit-limit-tokens-large"] == "100"
        await store.release(tenant, f"r{i}")
    with pytest.raises(RateLimited) as info:
        await store.admit(tenant, "one-too-many")
    exc = info.value
    assert exc.reason == "requests" and 0 < exc.retry_after_s <= LONG_WINDOW
    headers = refusal_headers(exc)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == str(n)
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert int(headers["Retry-After"]) >= exc.retry_after_s
    assert {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"} <= set(headers)

    other, _ = await store.create_tenant("beta", TenantSettings(requests_per_minute=1))
    assert (await store.admit(other, "r0")).tenant == "beta"  # one tenant's limit does not starve another


async def window_start(store) -> None:
    """Wait until just after a rate-limit window of ``store`` begins (by Redis's clock, as the scripts count), so
    that what a test does next falls in one window."""
    seconds, micros = await store.redis.time()
    now_ms = seconds * 1000 + micros // 1000
    await asyncio.sleep((store.window_ms - now_ms % store.window_ms) / 1000 + 0.01)


async def test_request_limit_resets_on_time(replicas):
    store = replicas(window_s=1.0)
    tenant, _ = await store.create_tenant("acme", TenantSettings(requests_per_minute=2))
    await window_start(store)
    with pytest.raises(RateLimited) as info:
        for i in range(3):
            await store.admit(tenant, f"r{i}")
    assert info.value.reason == "requests"
    assert 0 < info.value.retry_after_s <= 1.0
    await asyncio.sleep(info.value.retry_after_s + 0.05)
    admission = await store.admit(tenant, "after-reset")
    assert int(ratelimit_headers(admission.state)["x-ratelimit-remaining-requests"]) == 1


async def test_token_limits_per_pool_reset_on_time(replicas):
    store = replicas(window_s=1.0)
    tenant, _ = await store.create_tenant(
        "acme", TenantSettings(tokens_per_minute_small=1000, tokens_per_minute_large=100, requests_per_minute=1000)
    )
    await window_start(store)
    await store.charge_tokens(tenant, "small", 10)
    assert await store.charge_tokens(tenant, "large", 60) == 60
    await store.charge_tokens(tenant, "large", 40)
    with pytest.raises(RateLimited) as info:
        await store.admit(tenant, "r1")
    assert info.value.reason == "tokens"
    headers = refusal_headers(info.value)
    assert headers["x-ratelimit-remaining-tokens-large"] == "0"
    assert headers["x-ratelimit-remaining-tokens"] == "0" and headers["x-ratelimit-limit-tokens"] == "100"
    await asyncio.sleep(info.value.retry_after_s + 0.05)
    assert ratelimit_headers((await store.admit(tenant, "r1")).state)["x-ratelimit-remaining-tokens-large"] == "100"
    with pytest.raises(ValueError):
        await store.charge_tokens(tenant, "medium", 1)


async def test_crashed_replica_inflight_entries_expire(replicas):
    crashed = replicas(window_s=LONG_WINDOW, inflight_ttl_s=1.0)
    tenant, _ = await crashed.create_tenant("acme", TenantSettings(max_concurrent_requests=1))
    await crashed.admit(tenant, "orphan")  # never released
    survivor = replicas(window_s=LONG_WINDOW, inflight_ttl_s=1.0)
    with pytest.raises(RateLimited):
        await survivor.admit(tenant, "r1")
    await asyncio.sleep(1.1)
    assert await survivor.heartbeat(tenant, "orphan") is False
    await survivor.admit(tenant, "r1")


async def test_heartbeat_keeps_long_request_counted(replicas):
    store = replicas(window_s=LONG_WINDOW, inflight_ttl_s=1.0)
    tenant, _ = await store.create_tenant("acme", TenantSettings(max_concurrent_requests=1))
    await store.admit(tenant, "long")
    await asyncio.sleep(0.6)
    assert await store.heartbeat(tenant, "long") is True
    await asyncio.sleep(0.6)
    with pytest.raises(RateLimited):
        await store.admit(tenant, "other")
    await store.release(tenant, "long")
    await store.admit(tenant, "other")


# -- usage ------------------------------------------------------------------------------------------


async def test_usage_sums_equal_recorded(store, replicas):
    await store.create_tenant("acme")
    await store.create_tenant("beta")
    records = [
        ("small", dict(requests=1, prompt_tokens=30, output_tokens=70, steps=5, glimpses=5)),
        ("large", dict(prompt_tokens=30, output_tokens=120, steps=2)),
        ("small", dict(requests=1, prompt_tokens=11, output_tokens=9, steps=1, glimpses=3)),
        ("large", dict(output_tokens=40, steps=1)),
    ] * 5
    writers = [replicas() for _ in range(4)]
    await asyncio.gather(*(writers[i % 4].record_usage("acme", pool, **kw) for i, (pool, kw) in enumerate(records)))
    await store.record_usage("beta", "large", steps=99)

    usage = await store.usage("acme")
    for pool in ("small", "large"):
        for field in ("requests", "prompt_tokens", "output_tokens", "steps", "glimpses"):
            expected = sum(kw.get(field, 0) for p, kw in records if p == pool)
            assert usage["pools"][pool][field] == expected, (pool, field)
    assert usage["large_step_fraction"] == pytest.approx(15 / (15 + 30))
    empty = await store.usage("acme", day="2000-01-01")
    assert empty["large_step_fraction"] == 0.0 and empty["pools"]["large"]["steps"] == 0
    with pytest.raises(ValueError):
        await store.record_usage("acme", "medium", steps=1)
    with pytest.raises(ValueError):
        await store.usage("acme", day="*")


# -- CLI --------------------------------------------------------------------------------------------


@pytest.fixture
def cli(redis_url, capsys):
    """Run the tenants CLI in-process against the test Redis; returns (exit code, stdout, stderr)."""
    redis.Redis.from_url(redis_url).flushdb()

    def run(*argv: str) -> tuple[int, str, str]:
        code = tenants_cli.main(["tenants", *argv, "--redis-url", redis_url])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def test_cli_create_list_revoke(cli, redis_url):
    code, out, _ = cli("create", "acme", "--rpm", "5", "--tau", "0.7", "--models", "a,b", "--json")
    assert code == 0
    created = json.loads(out)
    key, prefix = created["key"], created["prefix"]
    assert key_prefix(key) == prefix

    async def authenticate():
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await TenantStore(client).authenticate(key)
        finally:
            await client.aclose()

    tenant = asyncio.run(authenticate())
    assert tenant.settings.requests_per_minute == 5 and tenant.settings.policy.tau == 0.7
    assert tenant.settings.allowed_models == ["a", "b"]

    code, out, _ = cli("list")
    assert code == 0 and "acme" in out and "a,b" in out
    code, out, _ = cli("keys", "acme")
    assert prefix in out and key not in out
    code, out, _ = cli("set", "acme", "--rpm", "9", "--models", "")
    assert code == 0 and "requests_per_minute" in out
    code, out, _ = cli("show", "acme", "--json")
    assert (
        json.loads(out)["settings"]["requests_per_minute"] == 9 and json.loads(out)["settings"]["allowed_models"] == []
    )
    assert key not in out

    code, out, _ = cli("revoke", prefix)
    assert code == 0 and prefix in out
    assert asyncio.run(authenticate()) is None
    code, _, err = cli("revoke", prefix)
    assert code == 1 and "no key" in err
    code, _, err = cli("create", "Bad Name")
    assert code == 1 and "invalid tenant name" in err


def test_cli_rotate_and_usage(cli, redis_url):
    _, out, _ = cli("create", "acme", "--json")
    old = json.loads(out)
    code, out, _ = cli("rotate", "acme", old["prefix"], "--json")
    new_prefix = key_prefix(json.loads(out)["key"])
    assert code == 0 and new_prefix != old["prefix"]
    code, out, _ = cli("keys", "acme", "--json")
    assert [k["prefix"] for k in json.loads(out)] == [new_prefix]

    async def record():
        client = aioredis.Redis.from_url(redis_url)
        store = TenantStore(client)
        await store.record_usage("acme", "small", requests=1, prompt_tokens=5, output_tokens=6, steps=3, glimpses=3)
        await store.record_usage("acme", "large", output_tokens=20, steps=1)
        await client.aclose()

    asyncio.run(record())
    code, out, _ = cli("usage", "acme")
    assert code == 0 and "large_step_fraction 0.250" in out and "total" in out
    code, out, _ = cli("usage", "acme", "--json")
    assert json.loads(out)["pools"]["large"]["output_tokens"] == 20
    code, _, err = cli("usage", "nobody")
    assert code == 1 and "no tenant" in err


def test_cli_standalone_module(redis_url):
    redis.Redis.from_url(redis_url).flushdb()
    env = {**os.environ, "REDIS_URL": redis_url}
    cmd = [sys.executable, "-m", "cluster.ops.tenants_cli", "tenants"]
    done = subprocess.run([*cmd, "create", "acme"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "gr-" in done.stdout
    listed = subprocess.run([*cmd, "list"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "acme" in listed.stdout


def test_admin_key_is_compared_in_constant_time(monkeypatch):
    import hmac

    from router_service.tenancy import keys as tenancy

    compared = []
    monkeypatch.setenv(tenancy.ADMIN_KEY_ENV, "gr-admin-secret")
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)
    assert tenancy.is_admin_key("gr-admin-secret") and not tenancy.is_admin_key("gr-admin-guess")
    assert len(compared) == 2
