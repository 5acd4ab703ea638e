"""Tenants, API keys, rate limits and usage metering, all in Redis so every router replica agrees.

Layout (``ns`` is the namespace, default ``glimp``)::

    {ns}:tenants                      set of tenant names
    {ns}:t:{tenant}:settings          TenantSettings as JSON
    {ns}:t:{tenant}:keys              hash  key prefix -> creation time
    {ns}:t:{tenant}:rl:req:{window}   requests admitted in a rate-limit window
    {ns}:t:{tenant}:rl:tok:{pool}:{window}  tokens charged to a pool in a window
    {ns}:t:{tenant}:inflight          sorted set  request id -> expiry (ms)
    {ns}:t:{tenant}:usage:{day}:{pool}  hash of usage counters of one UTC day
    {ns}:t:{tenant}:req:...           request state (see ``request_key_prefix``)
    {ns}:keys:{prefix}                hash  tenant, sha256 of the key, creation time

API keys look like ``gr-1a2b3c4d-<secret>``; ``gr-1a2b3c4d`` is the prefix that names the key in
listings and logs. Only the key's SHA-256 is stored; the plaintext is returned once, at creation,
and is never logged nor put in an exception message.

Limits are checked and counted by Lua scripts, so they hold across replicas. The scripts take the
time from Redis (``TIME``), so every replica sees the same window, and build their key names from
the tenant's base key: they suit a standalone Redis (or one shard), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import Field

from cluster.config import PolicySettings, PoolRole, StrictModel

log = logging.getLogger(__name__)

TENANT_NAME_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_KEY_RE = re.compile(r"^(gr-[0-9a-f]{8})-[A-Za-z0-9_-]{20,128}$")
_PREFIX_RE = re.compile(r"^gr-[0-9a-f]{8}$")
POOLS: tuple[PoolRole, ...] = ("small", "large")
USAGE_FIELDS = ("requests", "prompt_tokens", "output_tokens", "steps", "glimpses")
ADMIN_KEY_ENV = "GLIMP_ADMIN_KEY"


class TenantSettings(StrictModel):
    """One tenant's defaults and limits."""

    policy: PolicySettings = Field(default_factory=PolicySettings, description="Default routing policy and tau of the tenant's requests.")
    max_token_budget: int = Field(8192, ge=1, le=1_000_000, description="Ceiling on a request's token budget (all steps together).")
    allowed_models: list[str] = Field(default_factory=list, description="Model names the tenant may ask for; empty means all.")
    requests_per_minute: int = Field(60, ge=1, le=1_000_000, description="Requests admitted per rate-limit window (a minute).")
    tokens_per_minute_small: int = Field(1_000_000, ge=1, le=1_000_000_000, description="Small-pool tokens per window; none admitted once reached.")
    tokens_per_minute_large: int = Field(200_000, ge=1, le=1_000_000_000, description="Large-pool tokens per window; none admitted once reached.")
    max_concurrent_requests: int = Field(8, ge=1, le=100_000, description="Requests of the tenant in flight at once.")
    tau_floor: float | None = Field(None, ge=0, le=10, description="Load-aware tau never goes below this (None: the request's tau).")
    tau_ceiling: float | None = Field(None, ge=0, le=10, description="Load-aware tau never goes above this (None: no ceiling).")

    def allows_model(self, model: str) -> bool:
        """Whether the tenant may use ``model``."""
        return not self.allowed_models or model in self.allowed_models

    def tokens_per_minute(self, pool: PoolRole) -> int:
        """The token limit of ``pool``."""
        return self.tokens_per_minute_large if pool == "large" else self.tokens_per_minute_small


class Tenant(StrictModel):
    """A tenant: its name and settings."""

    name: str = Field(pattern=TENANT_NAME_RE, description="Lower-case name, also part of its Redis keys.")
    settings: TenantSettings = Field(default_factory=TenantSettings, description="Defaults and limits.")


@dataclass(frozen=True)
class ApiKeyInfo:
    """A key as listed: its prefix and creation time (epoch seconds), never the secret."""

    prefix: str
    created: float


class TenancyError(Exception):
    """Base of this module's errors; messages name keys by prefix only."""


class InvalidTenantName(TenancyError, ValueError):
    """A tenant name does not match ``TENANT_NAME_RE``."""


class TenantNotFound(TenancyError, LookupError):
    """No such tenant."""


class TenantExists(TenancyError):
    """A tenant of that name exists already."""


class KeyNotFound(TenancyError, LookupError):
    """No such API key (prefix), or not the tenant's."""


def _duration(seconds: float) -> str:
    """OpenAI-style duration: ``1.5s``, ``6m0s``."""
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest):d}s"


@dataclass(frozen=True)
class RateLimitState:
    """Where a tenant stands in the current window, as OpenAI's ``x-ratelimit-*`` headers tell it.

    The plain ``-tokens`` headers report the pool closest to its limit; ``-tokens-small`` and
    ``-tokens-large`` report each pool.
    """

    limit_requests: int
    remaining_requests: int
    limit_tokens: dict[str, int]
    remaining_tokens: dict[str, int]
    reset_s: float

    def headers(self) -> dict[str, str]:
        """The rate-limit headers of a response."""
        tight = min(POOLS, key=lambda p: self.remaining_tokens[p] / self.limit_tokens[p])
        reset = _duration(self.reset_s)
        headers = {
            "x-ratelimit-limit-requests": str(self.limit_requests),
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-reset-requests": reset,
            "x-ratelimit-limit-tokens": str(self.limit_tokens[tight]),
            "x-ratelimit-remaining-tokens": str(self.remaining_tokens[tight]),
            "x-ratelimit-reset-tokens": reset,
        }
        for pool in POOLS:
            headers[f"x-ratelimit-limit-tokens-{pool}"] = str(self.limit_tokens[pool])
            headers[f"x-ratelimit-remaining-tokens-{pool}"] = str(self.remaining_tokens[pool])
        return headers


@dataclass(frozen=True)
class Admission:
    """A request let in; ``release`` it when it ends."""

    tenant: str
    request_id: str
    state: RateLimitState

    def headers(self) -> dict[str, str]:
        """The rate-limit headers of the response."""
        return self.state.headers()


class RateLimited(TenancyError):
    """A request refused by a limit (HTTP 429): ``reason`` is ``requests``, ``tokens`` or ``concurrency``."""

    def __init__(self, tenant: str, reason: str, retry_after_s: float, state: RateLimitState):
        super().__init__(f"tenant {tenant!r}: {reason} limit reached; retry after {retry_after_s:.3f} s")
        self.tenant = tenant
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.state = state

    def headers(self) -> dict[str, str]:
        """The rate-limit headers and ``Retry-After`` (whole seconds, at least 1) of the 429."""
        return {**self.state.headers(), "Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def _text(value: bytes | str) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str | None:
    """The identifying prefix (``gr-1a2b3c4d``) of a well-formed API key, else None."""
    match = _KEY_RE.match(key or "")
    return match.group(1) if match else None


def is_admin_key(key: str | None) -> bool:
    """Whether ``key`` is the bootstrap admin key of ``GLIMP_ADMIN_KEY`` (constant-time; False if unset)."""
    admin = os.environ.get(ADMIN_KEY_ENV, "")
    if not admin or not key:
        return False
    return hmac.compare_digest(_hash_key(key), _hash_key(admin))


def check_tenant_name(name: str) -> str:
    """``name`` if it is a valid tenant name, else InvalidTenantName."""
    if not isinstance(name, str) or not re.match(TENANT_NAME_RE, name):
        raise InvalidTenantName(f"invalid tenant name {name!r}: must match {TENANT_NAME_RE}")
    return name


_NOW_LUA = (
    "local t = redis.call('TIME')\n"
    "local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
)


def _window_lua(body: str) -> str:
    """A script preceded by the current window: ``now_ms``, ``win``, ``reset_ms`` from Redis TIME and ARGV[1] (window ms)."""
    return (
        _NOW_LUA
        + "local window_ms = tonumber(ARGV[1])\n"
        "local win = math.floor(now_ms / window_ms)\n"
        "local reset_ms = (win + 1) * window_ms - now_ms\n"
        + body
    )


# KEYS[1] tenant base; ARGV: window_ms, request_id, rpm, tpm_small, tpm_large, max_concurrent, inflight_ttl_ms.
# Returns {admitted, reason, requests used, small tokens, large tokens, reset_ms, retry_ms}.
_ADMIT_LUA = _window_lua("""
local base = KEYS[1]
local req_key = base .. 'rl:req:' .. win
local inflight = base .. 'inflight'
local used = tonumber(redis.call('GET', req_key) or '0')
local small = tonumber(redis.call('GET', base .. 'rl:tok:small:' .. win) or '0')
local large = tonumber(redis.call('GET', base .. 'rl:tok:large:' .. win) or '0')
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
local running = redis.call('ZCARD', inflight)
if redis.call('ZSCORE', inflight, ARGV[2]) then running = running - 1 end
local reason = ''
local retry_ms = reset_ms
if used >= tonumber(ARGV[3]) then reason = 'requests'
elseif small >= tonumber(ARGV[4]) or large >= tonumber(ARGV[5]) then reason = 'tokens'
elseif running >= tonumber(ARGV[6]) then
  reason = 'concurrency'
  local first = redis.call('ZRANGE', inflight, 0, 0, 'WITHSCORES')
  retry_ms = math.min(1000, tonumber(first[2]) - now_ms)
end
if reason ~= '' then return {0, reason, used, small, large, reset_ms, retry_ms} end
used = redis.call('INCR', req_key)
redis.call('PEXPIRE', req_key, 2 * window_ms)
local ttl = tonumber(ARGV[7])
redis.call('ZADD', inflight, now_ms + ttl, ARGV[2])
redis.call('PEXPIRE', inflight, ttl)
return {1, '', used, small, large, reset_ms, 0}
""")

# KEYS[1] tenant base; ARGV: window_ms, pool, tokens. Returns the pool's tokens in this window.
_CHARGE_LUA = _window_lua("""
local key = KEYS[1] .. 'rl:tok:' .. ARGV[2] .. ':' .. win
local total = redis.call('INCRBY', key, ARGV[3])
redis.call('PEXPIRE', key, 2 * window_ms)
return total
""")

# KEYS[1] in-flight set; ARGV: request_id, ttl_ms. Returns 1 if the request was still counted.
_HEARTBEAT_LUA = _NOW_LUA + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: key record, tenant's key index, tenant settings; ARGV: tenant, hash, created, prefix.
# Returns 1, 0 if the prefix is taken, -1 if the tenant is gone.
_CREATE_KEY_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'hash', ARGV[2], 'created', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[3])
return 1
"""


class TenantStore:
    """Tenants, keys, limits and usage in Redis (``redis.asyncio`` client; decoded replies or not).

    ``window_s`` is the rate-limit window: the ``*_per_minute`` limits count per window, so it is
    60 in service and shorter in tests. ``inflight_ttl_s`` is how long a request counts against the
    concurrency limit unless released or ``heartbeat``-ed, so a crashed replica's requests expire.
    Nothing is cached locally: every call reads Redis, so changes are seen at once by every replica.
    """

    def __init__(self, redis, namespace: str = "glimp", *, window_s: float = 60.0, inflight_ttl_s: float = 600.0):
        self.redis = redis
        self.namespace = namespace
        self.window_ms = max(1, int(window_s * 1000))
        self.inflight_ttl_ms = max(1, int(inflight_ttl_s * 1000))
        self._admit = redis.register_script(_ADMIT_LUA)
        self._charge = redis.register_script(_CHARGE_LUA)
        self._create_key = redis.register_script(_CREATE_KEY_LUA)
        self._heartbeat = redis.register_script(_HEARTBEAT_LUA)

    # -- key names ------------------------------------------------------------------------------

    def _base(self, tenant: Tenant | str) -> str:
        return f"{self.namespace}:t:{check_tenant_name(_name(tenant))}:"

    def _settings_key(self, name: str) -> str:
        return self._base(name) + "settings"

    def _tenant_keys_key(self, name: str) -> str:
        return self._base(name) + "keys"

    def _key_record(self, prefix: str) -> str:
        return f"{self.namespace}:keys:{prefix}"

    def _usage_key(self, name: str, day: str, pool: str) -> str:
        return self._base(name) + f"usage:{day}:{pool}"

    def request_key_prefix(self, tenant: Tenant | str) -> str:
        """Prefix of the tenant's request-state keys (``{ns}:t:{tenant}:req:``): one tenant cannot reach another's."""
        return self._base(tenant) + "req:"

    # -- tenants --------------------------------------------------------------------------------

    async def create_tenant(self, name: str, settings: TenantSettings | None = None) -> tuple[Tenant, str]:
        """Create a tenant and its first API key; returns the tenant and the key's plaintext (shown once)."""
        tenant = Tenant(name=check_tenant_name(name), settings=settings or TenantSettings())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._settings_key(name), tenant.settings.model_dump_json(), nx=True)
            pipe.sadd(f"{self.namespace}:tenants", name)
            created, _ = await pipe.execute()
        if not created:
            raise TenantExists(f"tenant {name!r} exists already")
        log.info("created tenant %s", name)
        return tenant, await self.create_key(name)

    async def get_tenant(self, name: str) -> Tenant | None:
        """The tenant, or None."""
        raw = await self.redis.get(self._settings_key(name))
        return None if raw is None else Tenant(name=name, settings=TenantSettings.model_validate_json(raw))

    async def require_tenant(self, name: str) -> Tenant:
        """The tenant, or TenantNotFound."""
        tenant = await self.get_tenant(name)
        if tenant is None:
            raise TenantNotFound(f"no tenant {name!r}")
        return tenant

    async def list_tenants(self) -> list[Tenant]:
        """All tenants, by name."""
        names = sorted(_text(n) for n in await self.redis.smembers(f"{self.namespace}:tenants"))
        if not names:
            return []
        raws = await self.redis.mget([self._settings_key(n) for n in names])
        return [Tenant(name=n, settings=TenantSettings.model_validate_json(r)) for n, r in zip(names, raws) if r is not None]

    async def update_settings(self, name: str, changes: dict) -> Tenant:
        """Apply ``changes`` (a partial settings dict; ``policy`` may be partial too) and return the tenant."""
        current = (await self.require_tenant(name)).settings.model_dump()
        changes = dict(changes)
        if "policy" in changes:
            changes["policy"] = {**current["policy"], **changes["policy"]}
        tenant = Tenant(name=name, settings=TenantSettings.model_validate({**current, **changes}))
        if not await self.redis.set(self._settings_key(name), tenant.settings.model_dump_json(), xx=True):
            raise TenantNotFound(f"no tenant {name!r}")
        log.info("updated tenant %s: %s", name, sorted(changes))
        return tenant

    async def delete_tenant(self, name: str) -> None:
        """Revoke all the tenant's keys, then delete all its data (settings, limits, usage, request state)."""
        await self.require_tenant(name)
        for info in await self.list_keys(name):
            await self.revoke_key(info.prefix)
        await self.redis.srem(f"{self.namespace}:tenants", name)
        batch = []
        async for key in self.redis.scan_iter(match=self._base(name) + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self.redis.unlink(*batch)
                batch = []
        if batch:
            await self.redis.unlink(*batch)
        log.info("deleted tenant %s", name)

    # -- API keys -------------------------------------------------------------------------------

    async def create_key(self, tenant: Tenant | str) -> str:
        """A new API key of the tenant; returns its plaintext, which is stored only as a hash."""
        name = _name(tenant)
        while True:
            prefix = f"gr-{secrets.token_hex(4)}"
            key = f"{prefix}-{secrets.token_urlsafe(32)}"
            keys = [self._key_record(prefix), self._tenant_keys_key(name), self._settings_key(name)]
            done = await self._create_key(keys=keys, args=[name, _hash_key(key), repr(time.time()), prefix])
            if done == -1:
                raise TenantNotFound(f"no tenant {name!r}")
            if done == 1:
                log.info("created key %s for tenant %s", prefix, name)
                return key

    async def list_keys(self, tenant: Tenant | str) -> list[ApiKeyInfo]:
        """The tenant's keys (prefix and creation time), oldest first."""
        entries = await self.redis.hgetall(self._tenant_keys_key(_name(tenant)))
        infos = [ApiKeyInfo(_text(p), float(_text(c))) for p, c in entries.items()]
        return sorted(infos, key=lambda i: (i.created, i.prefix))

    async def rotate_key(self, tenant: Tenant | str, prefix: str) -> str:
        """Replace the tenant's key ``prefix`` by a new one (plaintext returned); the old one is revoked."""
        name = _name(tenant)
        if not await self.redis.hexists(self._tenant_keys_key(name), prefix):
            raise KeyNotFound(f"tenant {name!r} has no key {prefix!r}")
        key = await self.create_key(name)
        await self.revoke_key(prefix)
        return key

    async def revoke_key(self, prefix: str) -> str:
        """Revoke the key ``prefix`` at once for every replica; returns the tenant it belonged to."""
        if not _PREFIX_RE.match(prefix or ""):
            raise KeyNotFound("not a key prefix (expected gr-<8 hex>); the argument is not echoed, it may be a key")
        owner = await self.redis.hget(self._key_record(prefix), "tenant")
        if owner is None:
            raise KeyNotFound(f"no key {prefix!r}")
        name = _text(owner)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key_record(prefix))
            pipe.hdel(self._tenant_keys_key(name), prefix)
            await pipe.execute()
        log.info("revoked key %s of tenant %s", prefix, name)
        return name

    async def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant owning API key ``key``, or None (malformed, unknown, revoked, or tenant deleted)."""
        prefix = key_prefix(key or "")
        if prefix is None:
            return None
        record = {_text(k): _text(v) for k, v in (await self.redis.hgetall(self._key_record(prefix))).items()}
        if "hash" not in record or not hmac.compare_digest(record["hash"], _hash_key(key)):
            log.debug("authentication failed for key %s", prefix)
            return None
        return await self.get_tenant(record["tenant"])

    # -- limits ---------------------------------------------------------------------------------

    def _state(self, settings: TenantSettings, used: int, small: int, large: int, reset_ms: int) -> RateLimitState:
        limits = {pool: settings.tokens_per_minute(pool) for pool in POOLS}
        return RateLimitState(
            limit_requests=settings.requests_per_minute,
            remaining_requests=max(0, settings.requests_per_minute - used),
            limit_tokens=limits,
            remaining_tokens={"small": max(0, limits["small"] - small), "large": max(0, limits["large"] - large)},
            reset_s=reset_ms / 1000,
        )

    async def admit(self, tenant: Tenant, request_id: str) -> Admission:
        """Let a request in, or raise RateLimited: requests per window, tokens per pool, concurrency (one atomic script)."""
        s = tenant.settings
        args = [self.window_ms, request_id, s.requests_per_minute, s.tokens_per_minute_small,
                s.tokens_per_minute_large, s.max_concurrent_requests, self.inflight_ttl_ms]
        ok, reason, used, small, large, reset_ms, retry_ms = await self._admit(keys=[self._base(tenant)], args=args)
        state = self._state(s, used, small, large, reset_ms)
        if not ok:
            reason = _text(reason)
            log.info("tenant %s: request %s refused (%s limit)", tenant.name, request_id, reason)
            raise RateLimited(tenant.name, reason, retry_ms / 1000, state)
        return Admission(tenant.name, request_id, state)

    async def heartbeat(self, tenant: Tenant | str, request_id: str) -> bool:
        """Push back the expiry of an in-flight request (long requests); False if it is no longer counted."""
        keys = [self._base(tenant) + "inflight"]
        return bool(await self._heartbeat(keys=keys, args=[request_id, self.inflight_ttl_ms]))

    async def release(self, tenant: Tenant | str, request_id: str) -> None:
        """The request ended: it no longer counts against the concurrency limit."""
        await self.redis.zrem(self._base(tenant) + "inflight", request_id)

    async def charge_tokens(self, tenant: Tenant | str, pool: PoolRole, n: int) -> int:
        """Count ``n`` tokens against the pool's per-window limit; returns the pool's total in this window."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}")
        return int(await self._charge(keys=[self._base(tenant)], args=[self.window_ms, pool, int(n)]))

    # -- usage ----------------------------------------------------------------------------------

    async def record_usage(self, tenant: Tenant | str, pool: PoolRole, *, requests: int = 0, prompt_tokens: int = 0,
                           output_tokens: int = 0, steps: int = 0, glimpses: int = 0) -> None:
        """Add to the tenant's usage counters of ``pool`` for today (UTC), in one transaction."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}")
        key = self._usage_key(_name(tenant), _today(), pool)
        counts = dict(zip(USAGE_FIELDS, (requests, prompt_tokens, output_tokens, steps, glimpses)))
        async with self.redis.pipeline(transaction=True) as pipe:
            for field, n in counts.items():
                if n:
                    pipe.hincrby(key, field, n)
            await pipe.execute()

    async def usage(self, tenant: Tenant | str, day: str | None = None) -> dict:
        """Usage of one UTC day (``YYYY-MM-DD``, default today): counts per pool and the large-step fraction."""
        name, day = _name(tenant), day or _today()
        datetime.strptime(day, "%Y-%m-%d")  # ValueError if not a day
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in POOLS:
                pipe.hgetall(self._usage_key(name, day, pool))
            raws = await pipe.execute()
        pools = {}
        for pool, raw in zip(POOLS, raws):
            counts = {_text(k): int(v) for k, v in raw.items()}
            pools[pool] = {f: counts.get(f, 0) for f in USAGE_FIELDS}
        steps = pools["small"]["steps"] + pools["large"]["steps"]
        return {
            "tenant": name,
            "day": day,
            "pools": pools,
            "large_step_fraction": pools["large"]["steps"] / steps if steps else 0.0,
        }


def _name(tenant: Tenant | str) -> str:
    return tenant.name if isinstance(tenant, Tenant) else tenant


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")
