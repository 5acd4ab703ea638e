"""Per-request step state in Redis: created at admission, one atomic append per step, a lease owner.

Layout (namespaced by tenant, all keys share the request's TTL):
  ``{ns}:t:{tenant}:req:{id}``        hash: request (JSON), status, owner, lease_until, counters, final, error
  ``{ns}:t:{tenant}:req:{id}:steps``  list: one JSON record per complete step, in order
  ``{ns}:t:{tenant}:reqs``            sorted set: the tenant's request ids by creation time (listings)
  ``{ns}:reqs``                       sorted set: ``{tenant}/{id}`` by creation time (the admin's listing)
  ``{ns}:rid:{id}``                   the tenant of a request (the admin's lookups)
A step is appended only by the lease owner and only at the index it expects, so a replica that dies
leaves a consistent prefix of complete steps, and a resumed request never duplicates a step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import redis.asyncio as aioredis
from pydantic import Field

from cluster.config import PolicySettings, PriorityClass, StepSettings, StrictModel

RUNNING, FINISHED, FAILED, CANCELLED = "running", "finished", "failed", "cancelled"

_CREATE = """
-- KEYS: hash, tenant's index, global index, id's tenant; ARGV: request json, owner, lease_until, now, ttl, id,
-- tenant. Refuses an id the tenant uses; drops index entries older than the TTL. (Another tenant may use the
-- same id: the admin's lookup finds the first.)
if redis.call('EXISTS', KEYS[1]) == 1 then return -4 end
redis.call('HSET', KEYS[1], 'request', ARGV[1], 'status', 'running', 'owner', ARGV[2], 'lease_until', ARGV[3],
  'created_at', ARGV[4], 'steps_small', 0, 'steps_large', 0, 'output_tokens_small', 0, 'output_tokens_large', 0,
  'glimpses', 0)
local ttl = tonumber(ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[4], ARGV[7], 'EX', ttl, 'NX')
for i, member in ipairs({ARGV[6], ARGV[7] .. '/' .. ARGV[6]}) do
  redis.call('ZADD', KEYS[i + 1], ARGV[4], member)
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', tonumber(ARGV[4]) - ttl)
  redis.call('EXPIRE', KEYS[i + 1], ttl)
end
return 1
"""

_APPEND = """
-- KEYS[1] hash, KEYS[2] steps; ARGV: owner, expected index, step json, pool, out tokens, glimpse, lease_until, ttl
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -2 end
if redis.call('LLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return -3 end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[1], 'steps_' .. ARGV[4], 1)
redis.call('HINCRBY', KEYS[1], 'output_tokens_' .. ARGV[4], tonumber(ARGV[5]))
redis.call('HINCRBY', KEYS[1], 'glimpses', tonumber(ARGV[6]))
redis.call('HSET', KEYS[1], 'lease_until', ARGV[7])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[8]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
return redis.call('LLEN', KEYS[2])
"""

_CLAIM = """
-- KEYS[1] hash; ARGV: owner, now, lease_until. Take the lease if free, expired or already ours.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
local owner = redis.call('HGET', KEYS[1], 'owner')
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0')
if owner ~= ARGV[1] and lease > tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_until', ARGV[3])
return 1
"""

_SET_STATUS = """
-- KEYS[1] hash; ARGV: owner, status, field, value. Only the owner of a running request ends it.
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -2 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[3], ARGV[4], 'ended_at', ARGV[5])
return 1
"""


class StateConflict(RuntimeError):
    """The request is not ours to change: it ended, another replica owns it, or a step is out of order."""


class RequestNotFound(KeyError):
    """No such request for this tenant (or it expired)."""


class StoredRequest(StrictModel):
    """A request as stored at admission: all a router replica needs to run it, or to resume it after another
    replica died."""

    endpoint: Literal["chat", "completions"] = Field(description="The endpoint it came to.")
    model: str = Field(description="The model name the client asked for.")
    messages: list[dict] = Field(description="The chat messages (a completion's prompt is one user message).")
    policy: PolicySettings = Field(description="The routing policy in force: router < tenant < request.")
    steps: StepSettings = Field(description="The step loop's limits and sampling defaults in force.")
    temperature: float = Field(description="Sampling temperature of every step and of the answer.")
    top_p: float = Field(description="Nucleus sampling of every step and of the answer.")
    seed: int | None = Field(None, description="The client's seed (step i samples with seed + i).")
    stream: bool = Field(False, description="Whether the client asked for a stream.")
    user: str | None = Field(None, description="The client's end-user id (OpenAI's ``user``), kept in the trace.")
    include_usage: bool = Field(False, description="Stream a usage chunk at the end.")
    prompt_tokens: int = Field(0, ge=0, description="Tokens of the rendered prompt.")
    priority: PriorityClass = Field("standard", description="The request's class (at most its tenant's).")


@dataclass
class StepRecord:
    """One complete step as kept in Redis and returned in a response's ``routing``."""

    index: int
    pool: str
    entropy: float | None
    text: str
    output_tokens: int
    prompt_tokens: int
    cached_tokens: int
    glimpse_ms: float
    step_ms: float
    finish_reason: str | None
    ended_by_eos: bool = False
    glimpse_fused: bool = False  # its glimpse came from the previous small step's call
    glimpse_prompt_tokens: int = 0  # the prompt tokens its glimpse's call processed (0: none, or in the step call)
    glimpse_cached_tokens: int = 0  # of those, the ones the small pool's prefix cache held

    @classmethod
    def from_json(cls, raw: bytes | str) -> StepRecord:
        return cls(**json.loads(raw))


@dataclass
class RequestState:
    """A request read back from Redis."""

    request_id: str
    tenant: str
    request: StoredRequest
    status: str
    owner: str
    lease_until: float
    created_at: float
    steps: list[StepRecord] = field(default_factory=list)
    final: dict | None = None
    error: str | None = None
    glimpses: int = 0

    def trace(self) -> dict:
        """The JSON trace served by ``GET /v1/requests/{id}``."""
        out = asdict(self)
        out.pop("lease_until")
        out.pop("owner")
        out["request"] = self.request.model_dump(mode="json")
        return out


class RequestStateStore:
    """Request state for one Redis; every call takes the tenant, so tenants never share keys."""

    def __init__(self, client: aioredis.Redis, namespace: str = "glimp", ttl_s: int = 86_400, lease_s: float = 30.0):
        self.redis = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._create = client.register_script(_CREATE)
        self._append = client.register_script(_APPEND)
        self._claim = client.register_script(_CLAIM)
        self._set_status = client.register_script(_SET_STATUS)

    def _keys(self, tenant: str, request_id: str) -> tuple[str, str]:
        base = f"{self.namespace}:t:{tenant}:req:{request_id}"
        return base, base + ":steps"

    def _indexes(self, tenant: str) -> tuple[str, str]:
        return f"{self.namespace}:t:{tenant}:reqs", f"{self.namespace}:reqs"

    async def create(self, tenant: str, request_id: str, request: StoredRequest, owner: str) -> None:
        """Record a new running request owned by ``owner``, with its TTL, and index it, in one atomic script."""
        key, _ = self._keys(tenant, request_id)
        now = time.time()
        keys = [key, *self._indexes(tenant), f"{self.namespace}:rid:{request_id}"]
        args = [request.model_dump_json(), owner, now + self.lease_s, now, self.ttl_s, request_id, tenant]
        if await self._create(keys=keys, args=args) < 0:
            raise StateConflict(f"request id {request_id} is in use")

    async def append_step(self, tenant: str, request_id: str, owner: str, step: StepRecord, glimpsed: bool) -> int:
        """Append step ``step.index`` atomically (owner and index checked); renews the lease."""
        key, steps = self._keys(tenant, request_id)
        result = await self._append(
            keys=[key, steps],
            args=[
                owner,
                step.index,
                json.dumps(asdict(step)),
                step.pool,
                step.output_tokens,
                int(glimpsed),
                time.time() + self.lease_s,
                self.ttl_s,
            ],
        )
        if result < 0:
            raise StateConflict(f"request {request_id}: step {step.index} refused ({_REASONS[result]})")
        return result

    async def claim(self, tenant: str, request_id: str, owner: str) -> None:
        """Take over a running request whose lease expired (or renew our own lease)."""
        key, _ = self._keys(tenant, request_id)
        now = time.time()
        result = await self._claim(keys=[key], args=[owner, now, now + self.lease_s])
        if result < 0:
            if not await self.redis.exists(key):
                raise RequestNotFound(request_id)
            raise StateConflict(f"request {request_id}: cannot resume ({_REASONS[result]})")

    async def finish(self, tenant: str, request_id: str, owner: str, final: dict) -> None:
        """Mark the request finished with its final answer."""
        await self._end(tenant, request_id, owner, FINISHED, "final", json.dumps(final))

    async def fail(self, tenant: str, request_id: str, owner: str, status: str, error: str) -> None:
        """Mark the request failed or cancelled; its steps stay as they are."""
        await self._end(tenant, request_id, owner, status, "error", error)

    async def _end(self, tenant: str, request_id: str, owner: str, status: str, field_name: str, value: str) -> None:
        key, _ = self._keys(tenant, request_id)
        result = await self._set_status(keys=[key], args=[owner, status, field_name, value, time.time()])
        if result < 0:
            raise StateConflict(f"request {request_id}: cannot set {status} ({_REASONS[result]})")

    async def get(self, tenant: str, request_id: str) -> RequestState:
        """Read the whole state (request, status, steps, final) in one round trip."""
        key, steps = self._keys(tenant, request_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.lrange(steps, 0, -1)
            fields, raw_steps = await pipe.execute()
        if not fields:
            raise RequestNotFound(request_id)
        f = {
            k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
            for k, v in fields.items()
        }
        return RequestState(
            request_id=request_id,
            tenant=tenant,
            request=StoredRequest.model_validate_json(f["request"]),
            status=f.get("status", RUNNING),
            owner=f.get("owner", ""),
            lease_until=float(f.get("lease_until", 0)),
            created_at=float(f.get("created_at", 0)),
            steps=[StepRecord.from_json(s) for s in raw_steps],
            final=json.loads(f["final"]) if "final" in f else None,
            error=f.get("error"),
            glimpses=int(f.get("glimpses", 0)),
        )

    async def list_ids(self, tenant: str | None, limit: int = 20) -> tuple[list[str], bool]:
        """One tenant's request ids (every tenant's as ``tenant/id`` when ``tenant`` is None), newest first, at
        most ``limit``; and whether there are more."""
        index = self._indexes(tenant or "")[1 if tenant is None else 0]
        await self.redis.zremrangebyscore(index, "-inf", time.time() - self.ttl_s)
        ids = [_text(i) for i in await self.redis.zrevrange(index, 0, limit)]
        return ids[:limit], len(ids) > limit

    async def tenant_of(self, request_id: str) -> str:
        """The tenant a request belongs to (the admin's lookups), else RequestNotFound."""
        tenant = await self.redis.get(f"{self.namespace}:rid:{request_id}")
        if tenant is None:
            raise RequestNotFound(request_id)
        return _text(tenant)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_REASONS = {-1: "request is not running", -2: "another replica holds the lease", -3: "step out of order"}
