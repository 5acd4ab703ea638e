"""Rate, token and concurrency limits of a tenant, checked and counted atomically in Redis.

Limits are checked and counted by Lua scripts, so they hold across replicas. The scripts take the
time from Redis (``TIME``), so every replica sees the same window, and build their key names from
the tenant's base key: they suit a standalone Redis (or one shard), not Redis Cluster. How a limit reads
as HTTP headers is the API's business (``router_service/headers.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cluster.config import PoolRole
from router_service.tenancy.settings import POOLS, TenancyError, Tenant, TenantKeys, TenantSettings, text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RateLimitState:
    """Where a tenant stands in the current window: limits and what remains of them, per pool for tokens."""

    limit_requests: int
    remaining_requests: int
    limit_tokens: dict[str, int]
    remaining_tokens: dict[str, int]
    reset_s: float


@dataclass(frozen=True)
class Admission:
    """A request let in; ``release`` it when it ends."""

    tenant: str
    request_id: str
    state: RateLimitState


class RateLimited(TenancyError):
    """A request refused by a limit (HTTP 429): ``reason`` is ``requests``, ``tokens`` or ``concurrency``."""

    def __init__(self, tenant: str, reason: str, retry_after_s: float, state: RateLimitState):
        super().__init__(f"tenant {tenant!r}: {reason} limit reached; retry after {retry_after_s:.3f} s")
        self.tenant = tenant
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.state = state


_NOW_LUA = "local t = redis.call('TIME')\nlocal now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"


def _window_lua(body: str) -> str:
    """A script preceded by the current window: ``now_ms``, ``win``, ``reset_ms`` from Redis TIME and ARGV[1]
    (window ms)."""
    return (
        _NOW_LUA + "local window_ms = tonumber(ARGV[1])\n"
        "local win = math.floor(now_ms / window_ms)\n"
        "local reset_ms = (win + 1) * window_ms - now_ms\n" + body
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
_HEARTBEAT_LUA = (
    _NOW_LUA
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# KEYS: key record, tenant's key index, tenant settings; ARGV: tenant, hash, created, prefix.


class RateLimiter(TenantKeys):
    """A tenant's limits in Redis (``redis.asyncio`` client; decoded replies or not).

    ``window_s`` is the rate-limit window: the ``*_per_minute`` limits count per window, so it is
    60 in service and shorter in tests. ``inflight_ttl_s`` is how long a request counts against the
    concurrency limit unless released or ``heartbeat``-ed, so a crashed replica's requests expire.
    """

    def __init__(self, redis, namespace: str = "glimp", *, window_s: float = 60.0, inflight_ttl_s: float = 600.0):
        TenantKeys.__init__(self, redis, namespace)
        self.window_ms = max(1, int(window_s * 1000))
        self.inflight_ttl_ms = max(1, int(inflight_ttl_s * 1000))
        self._admit = redis.register_script(_ADMIT_LUA)
        self._charge = redis.register_script(_CHARGE_LUA)
        self._heartbeat = redis.register_script(_HEARTBEAT_LUA)

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
        """Let a request in, or raise RateLimited: requests per window, tokens per pool, concurrency (one atomic
        script)."""
        s = tenant.settings
        args = [
            self.window_ms,
            request_id,
            s.requests_per_minute,
            s.tokens_per_minute_small,
            s.tokens_per_minute_large,
            s.max_concurrent_requests,
            self.inflight_ttl_ms,
        ]
        ok, reason, used, small, large, reset_ms, retry_ms = await self._admit(keys=[self._base(tenant)], args=args)
        state = self._state(s, used, small, large, reset_ms)
        if not ok:
            reason = text(reason)
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
