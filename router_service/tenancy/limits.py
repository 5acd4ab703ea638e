"""Rate, token and concurrency limits of a tenant, checked and counted atomically in Redis.

The request and token limits hold over a sliding window (a minute in service): an admission or a charge counts
for exactly one window length after it was made, so no boundary lets twice the rate through, and a refusal's
retry time is exact (when enough of the window has left). Limits are checked and counted by Lua scripts, so
they hold across replicas. The scripts take the time from Redis (``TIME``), so every replica sees the same
window, and build their key names from
the tenant's base key: they suit a standalone Redis (or one shard), not Redis Cluster. How a limit reads
as HTTP headers is the API's business (``router_service/headers.py``).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from cluster.config import PoolRole
from router_service.tenancy.settings import POOLS, TenancyError, Tenant, TenantKeys, TenantSettings, text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RateLimitState:
    """Where a tenant stands in its sliding window: limits and what remains of them, per pool for tokens, and
    when each would be whole again (seconds until the window's newest admission or charge leaves it)."""

    limit_requests: int
    remaining_requests: int
    limit_tokens: dict[str, int]
    remaining_tokens: dict[str, int]
    reset_s: float
    reset_tokens_s: float | None = None  # None: as reset_s


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

# A sliding window of length ARGV[1] ms ending now: an admission or charge made at t counts while now < t + window.
# Requests are a sorted set of admissions scored by time; a pool's tokens a sorted set of charges ("id:tokens")
# with their sum kept beside it, expired charges taken off the sum as they leave.
_WINDOW_LUA = (
    _NOW_LUA
    + """
local window_ms = tonumber(ARGV[1])
local since = now_ms - window_ms
local function charged(member)
  return tonumber(string.match(member, ':(%d+)$'))
end
local function pool_tokens(key)
  local sum = tonumber(redis.call('GET', key .. ':sum') or '0')
  local gone = redis.call('ZRANGEBYSCORE', key, '-inf', since)
  if #gone > 0 then
    for _, member in ipairs(gone) do sum = sum - charged(member) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', since)
    if redis.call('ZCARD', key) == 0 then
      sum = 0
      redis.call('DEL', key .. ':sum')
    else
      redis.call('SET', key .. ':sum', sum, 'KEEPTTL')
    end
  end
  return sum
end
local function newest_leaves_in(key)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #newest == 0 then return 0 end
  return tonumber(newest[2]) + window_ms - now_ms
end
"""
)

# KEYS[1] tenant base; ARGV: window_ms, request_id, rpm, tpm_small, tpm_large, max_concurrent, inflight_ttl_ms,
# admission id. Returns {admitted, reason, requests used, small tokens, large tokens, requests reset ms,
# tokens reset ms, retry ms}; retry ms is exact for the request and token limits (when enough of the window leaves).
_ADMIT_LUA = (
    _WINDOW_LUA
    + """
local base = KEYS[1]
local req_key = base .. 'rl:req'
local small_key, large_key = base .. 'rl:tok:small', base .. 'rl:tok:large'
redis.call('ZREMRANGEBYSCORE', req_key, '-inf', since)
local used = redis.call('ZCARD', req_key)
local small, large = pool_tokens(small_key), pool_tokens(large_key)
local limits = {small = tonumber(ARGV[4]), large = tonumber(ARGV[5])}
local inflight = base .. 'inflight'
redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
local running = redis.call('ZCARD', inflight)
if redis.call('ZSCORE', inflight, ARGV[2]) then running = running - 1 end
local reason, retry_ms = '', 0
local function below_limit_in(key, sum, limit)
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    sum = sum - charged(entries[i])
    if sum < limit then return tonumber(entries[i + 1]) + window_ms - now_ms end
  end
  return window_ms
end
if used >= tonumber(ARGV[3]) then
  reason = 'requests'
  local nth = redis.call('ZRANGE', req_key, used - tonumber(ARGV[3]), used - tonumber(ARGV[3]), 'WITHSCORES')
  retry_ms = tonumber(nth[2]) + window_ms - now_ms
elseif small >= limits.small or large >= limits.large then
  reason = 'tokens'
  if small >= limits.small then retry_ms = below_limit_in(small_key, small, limits.small) end
  if large >= limits.large then retry_ms = math.max(retry_ms, below_limit_in(large_key, large, limits.large)) end
elseif running >= tonumber(ARGV[6]) then
  reason = 'concurrency'
  local first = redis.call('ZRANGE', inflight, 0, 0, 'WITHSCORES')
  retry_ms = math.min(1000, tonumber(first[2]) - now_ms)
end
local function reply(ok)
  local tokens_reset = math.max(newest_leaves_in(small_key), newest_leaves_in(large_key))
  return {ok, reason, used, small, large, newest_leaves_in(req_key), tokens_reset, retry_ms}
end
if reason ~= '' then return reply(0) end
redis.call('ZADD', req_key, now_ms, ARGV[2] .. ':' .. ARGV[8])
redis.call('PEXPIRE', req_key, window_ms)
used = used + 1
local ttl = tonumber(ARGV[7])
redis.call('ZADD', inflight, now_ms + ttl, ARGV[2])
redis.call('PEXPIRE', inflight, ttl)
return reply(1)
"""
)

# KEYS[1] tenant base; ARGV: window_ms, pool, tokens, charge id. Returns the pool's tokens in the window.
_CHARGE_LUA = (
    _WINDOW_LUA
    + """
local key = KEYS[1] .. 'rl:tok:' .. ARGV[2]
local sum = pool_tokens(key)
local n = tonumber(ARGV[3])
if n <= 0 then return sum end
redis.call('ZADD', key, now_ms, ARGV[4] .. ':' .. n)
sum = redis.call('INCRBY', key .. ':sum', n)
redis.call('PEXPIRE', key, window_ms)
redis.call('PEXPIRE', key .. ':sum', window_ms)
return sum
"""
)

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


class RateLimiter(TenantKeys):
    """A tenant's limits in Redis (``redis.asyncio`` client; decoded replies or not).

    ``window_s`` is the length of the sliding window the ``*_per_minute`` limits count over, so it is
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

    def _state(
        self, settings: TenantSettings, used: int, small: int, large: int, reset_ms: int, reset_tokens_ms: int
    ) -> RateLimitState:
        limits = {pool: settings.tokens_per_minute(pool) for pool in POOLS}
        return RateLimitState(
            limit_requests=settings.requests_per_minute,
            remaining_requests=max(0, settings.requests_per_minute - used),
            limit_tokens=limits,
            remaining_tokens={"small": max(0, limits["small"] - small), "large": max(0, limits["large"] - large)},
            reset_s=reset_ms / 1000,
            reset_tokens_s=reset_tokens_ms / 1000,
        )

    async def admit(self, tenant: Tenant, request_id: str) -> Admission:
        """Let a request in, or raise RateLimited: requests and tokens per pool over the sliding window, concurrency
        (one atomic script)."""
        s = tenant.settings
        args = [
            self.window_ms,
            request_id,
            s.requests_per_minute,
            s.tokens_per_minute_small,
            s.tokens_per_minute_large,
            s.max_concurrent_requests,
            self.inflight_ttl_ms,
            uuid.uuid4().hex[:12],
        ]
        ok, reason, used, small, large, reset_ms, reset_tokens_ms, retry_ms = await self._admit(
            keys=[self._base(tenant)], args=args
        )
        state = self._state(s, used, small, large, reset_ms, reset_tokens_ms)
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
        """Count ``n`` tokens against the pool's limit; returns the pool's tokens in the sliding window."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}")
        args = [self.window_ms, pool, int(n), uuid.uuid4().hex[:12]]
        return int(await self._charge(keys=[self._base(tenant)], args=args))
