"""Tenancy in Redis, so every router replica agrees: tenants and API keys (``keys``), limits (``limits``) and
usage metering (``usage``); ``settings`` holds a tenant's data and the key names. ``TenantStore`` is all three on
one Redis client."""

from __future__ import annotations

from router_service.tenancy.keys import ADMIN_KEY_ENV, ApiKeyInfo, TenantDirectory, is_admin_key, key_prefix
from router_service.tenancy.limits import Admission, RateLimited, RateLimiter, RateLimitState
from router_service.tenancy.settings import (
    POOLS,
    TENANT_NAME_RE,
    InvalidTenantName,
    KeyNotFound,
    TenancyError,
    Tenant,
    TenantExists,
    TenantNotFound,
    TenantSettings,
    admin_tenant,
    check_tenant_name,
)
from router_service.tenancy.usage import USAGE_FIELDS, UsageMeter


class TenantStore(TenantDirectory, RateLimiter, UsageMeter):
    """Tenants, keys, limits and usage on one Redis client (``redis.asyncio``; decoded replies or not). See
    ``RateLimiter`` for ``window_s`` and ``inflight_ttl_s``."""

    def __init__(self, redis, namespace: str = "glimp", *, window_s: float = 60.0, inflight_ttl_s: float = 600.0):
        RateLimiter.__init__(self, redis, namespace, window_s=window_s, inflight_ttl_s=inflight_ttl_s)
        TenantDirectory.__init__(self, redis, namespace)


__all__ = [
    "ADMIN_KEY_ENV",
    "POOLS",
    "TENANT_NAME_RE",
    "USAGE_FIELDS",
    "Admission",
    "ApiKeyInfo",
    "InvalidTenantName",
    "KeyNotFound",
    "RateLimitState",
    "RateLimited",
    "RateLimiter",
    "TenancyError",
    "Tenant",
    "TenantDirectory",
    "TenantExists",
    "TenantNotFound",
    "TenantSettings",
    "TenantStore",
    "UsageMeter",
    "admin_tenant",
    "check_tenant_name",
    "is_admin_key",
    "key_prefix",
]
