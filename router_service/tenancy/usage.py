"""Usage metering: per tenant, per pool and per UTC day, the counters a bill or a dashboard reads."""

from __future__ import annotations

from datetime import datetime, timezone

from cluster.config import PoolRole
from router_service.tenancy.settings import POOLS, Tenant, TenantKeys, tenant_name, text

USAGE_FIELDS = ("requests", "prompt_tokens", "output_tokens", "steps", "glimpses")


class UsageMeter(TenantKeys):
    """A tenant's usage counters in Redis."""

    async def record_usage(
        self,
        tenant: Tenant | str,
        pool: PoolRole,
        *,
        requests: int = 0,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        steps: int = 0,
        glimpses: int = 0,
    ) -> None:
        """Add to the tenant's usage counters of ``pool`` for today (UTC), in one transaction."""
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}")
        key = self._usage_key(tenant_name(tenant), _today(), pool)
        counts = dict(zip(USAGE_FIELDS, (requests, prompt_tokens, output_tokens, steps, glimpses), strict=False))
        async with self.redis.pipeline(transaction=True) as pipe:
            for field, n in counts.items():
                if n:
                    pipe.hincrby(key, field, n)
            await pipe.execute()

    async def usage(self, tenant: Tenant | str, day: str | None = None) -> dict:
        """Usage of one UTC day (``YYYY-MM-DD``, default today): counts per pool and the large-step fraction."""
        name, day = tenant_name(tenant), day or _today()
        datetime.strptime(day, "%Y-%m-%d")  # ValueError if not a day
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool in POOLS:
                pipe.hgetall(self._usage_key(name, day, pool))
            raws = await pipe.execute()
        pools = {}
        for pool, raw in zip(POOLS, raws, strict=False):
            counts = {text(k): int(v) for k, v in raw.items()}
            pools[pool] = {f: counts.get(f, 0) for f in USAGE_FIELDS}
        steps = pools["small"]["steps"] + pools["large"]["steps"]
        return {
            "tenant": name,
            "day": day,
            "pools": pools,
            "large_step_fraction": pools["large"]["steps"] / steps if steps else 0.0,
        }


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")
